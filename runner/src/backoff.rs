//! The runner's one back-off: how long to wait before trying a call again, for reconnecting
//! (the session), fetching a base and delivering a result (a job), and shipping log lines.
//!
//! Exponential from 200 ms, doubling to a cap of 5 s, each pause drawn from the upper half of
//! its step (`[step/2, step]`) so that runners that lost the same server do not come back in
//! step.

use std::time::Duration;

/// The first step.
const FIRST: Duration = Duration::from_millis(200);
/// The longest pause.
const CAP: Duration = Duration::from_secs(5);

/// Jittered exponential back-off, capped.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    /// Pauses taken since the last [`Backoff::reset`].
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pause before the next try.
    #[allow(
        clippy::should_implement_trait,
        reason = "an endless sequence: an Iterator's Option would always be Some"
    )]
    pub fn next(&mut self) -> Duration {
        // Jitter from the clock's low bits: good enough to spread runners out.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()))
            .unwrap_or(0);
        self.next_with(nanos)
    }

    /// [`Backoff::next`] with the jitter drawn from `roll`.
    fn next_with(&mut self, roll: u64) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        let step = self.step();
        let half = step / 2;
        Duration::from_millis(half + roll % (step - half + 1))
    }

    /// The current step in milliseconds: 200, 400, … up to the cap.
    fn step(&self) -> u64 {
        let first = FIRST.as_millis() as u64;
        let doublings = self.attempt.saturating_sub(1).min(16);
        (first << doublings).min(CAP.as_millis() as u64)
    }

    /// Starts again from the first step (the call went through).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_from_the_first_step_to_the_cap() {
        let mut b = Backoff::new();
        let steps: Vec<u64> = (0..8)
            .map(|_| {
                b.next_with(u64::MAX - 1);
                b.step()
            })
            .collect();
        assert_eq!(steps, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn every_pause_lies_in_the_upper_half_of_its_step() {
        for roll in [0, 1, 99, 100, 101, 12_345, u64::from(u32::MAX)] {
            let mut b = Backoff::new();
            for _ in 0..40 {
                let pause = b.next_with(roll).as_millis() as u64;
                let step = b.step();
                assert!(
                    (step / 2..=step).contains(&pause),
                    "{pause} ms for step {step}"
                );
            }
        }
    }

    #[test]
    fn a_reset_starts_again_and_many_failures_do_not_overflow() {
        let mut b = Backoff::new();
        for _ in 0..100 {
            b.next_with(7);
        }
        assert!(b.next_with(0) >= CAP / 2);
        b.reset();
        let first = b.next_with(u64::MAX);
        assert!(first <= FIRST, "{first:?}");
    }
}
