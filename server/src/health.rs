//! Which of the server's background loops are alive, for `/readyz` and the gRPC health
//! service.
//!
//! Each supervised loop holds an [`Alive`] for as long as its future lives: the loop ending,
//! panicking or being dropped marks it stopped (and wakes whoever watches, [`Loops::changed`]).
//! The supervisor in `app.rs` stops the server when a loop ends unasked, so a stopped loop is
//! seen only in the moments before the server stops; readiness says so in those moments.
//!
//! This module sits in the lowest layer: it names nothing of the crate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The loops and whether each is alive.
#[derive(Debug, Default)]
pub struct Loops {
    alive: Mutex<BTreeMap<&'static str, bool>>,
    changed: Notify,
}

/// A loop's liveness, held by its future: dropped, the loop counts as stopped.
#[derive(Debug)]
pub struct Alive {
    name: &'static str,
    loops: Arc<Loops>,
}

impl Loops {
    /// `name` starts: alive until the returned [`Alive`] is dropped.
    pub fn enter(self: &Arc<Self>, name: &'static str) -> Alive {
        self.set(name, true);
        Alive {
            name,
            loops: Arc::clone(self),
        }
    }

    fn set(&self, name: &'static str, alive: bool) {
        self.alive
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name, alive);
        self.changed.notify_waiters();
    }

    /// The loops that are not alive, by name (empty: all are).
    pub fn stopped(&self) -> Vec<&'static str> {
        self.alive
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, alive)| !**alive)
            .map(|(name, _)| *name)
            .collect()
    }

    /// Resolves when a loop starts or stops after this call (the future counts from its
    /// creation, before it is first polled).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.loops.set(self.name, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loop_is_alive_while_its_future_lives_and_stopped_after_a_panic() {
        let loops = Arc::new(Loops::default());
        let alive = loops.enter("dispatch");
        let handle = tokio::spawn(async move {
            let _alive = alive;
            panic!("the loop panics");
        });
        let _ = loops.enter("integrator");
        assert!(handle.await.is_err());
        assert_eq!(loops.stopped(), ["dispatch", "integrator"]);
        let _kept = loops.enter("integrator");
        assert_eq!(loops.stopped(), ["dispatch"]);
    }
}
