//! What agents cost over the last day, as `status` shows it (`cost_cents_last_day`,
//! `tokens_last_day`: input and output tokens), without a database round trip.
//!
//! The design: the cents and tokens of the runs that ended, summed per minute of their end, in
//! memory, for the last 24 hours (at most 1,441 minutes). They are loaded at start-up from the
//! store (one aggregate query over the `runs_charged` index, with the task counts) and added to
//! when a committed write ends runs (in the coordinator's `committed`, after the database has
//! them: memory follows the database). `status` drops the minutes that left the window and sums
//! the rest: no query, no timer, at most 1,441 additions. The window is counted in whole
//! minutes: a run counts until the minute it ended is wholly more than 24 hours old, so up to a
//! minute longer than 24 hours.

use std::collections::VecDeque;

use crate::domain::Millis;
use crate::store::UsageBucket;

/// How far back the figures look.
pub const DAY_MS: Millis = 24 * 3_600_000;
/// The span the runs' ends are summed over.
pub const BUCKET_MS: Millis = 60_000;

/// The start of the span `at` falls in.
fn bucket_of(at: Millis) -> Millis {
    at.div_euclid(BUCKET_MS) * BUCKET_MS
}

/// The last day's cost and tokens, per minute, oldest first.
#[derive(Clone, Debug, Default)]
pub struct LastDay {
    buckets: VecDeque<UsageBucket>,
}

impl LastDay {
    /// Where the figures for `now` begin: the start of the oldest minute still in the window
    /// (what the start-up load reads from).
    pub fn since(now: Millis) -> Millis {
        bucket_of(now - DAY_MS)
    }

    /// Starts from the stored sums (per [`BUCKET_MS`], as [`crate::store::Store::usage_since`]
    /// returns them from [`LastDay::since`]).
    pub fn load(&mut self, mut buckets: Vec<UsageBucket>, now: Millis) {
        buckets.sort_by_key(|b| b.start);
        self.buckets = buckets.into();
        self.evict(now);
    }

    /// Runs that ended at `at` cost `cost_cents` and used `tokens`.
    pub fn record(&mut self, at: Millis, cost_cents: f64, tokens: u64) {
        if cost_cents <= 0.0 && tokens == 0 {
            return;
        }
        let start = bucket_of(at);
        let i = self.buckets.partition_point(|b| b.start < start);
        match self.buckets.get_mut(i) {
            Some(b) if b.start == start => {
                b.cost_cents += cost_cents;
                b.tokens = b.tokens.saturating_add(tokens);
            }
            _ => self.buckets.insert(
                i,
                UsageBucket {
                    start,
                    cost_cents,
                    tokens,
                },
            ),
        }
    }

    /// The cents and the tokens of the runs that ended within the last day at `now`.
    pub fn totals(&mut self, now: Millis) -> (f64, u64) {
        self.evict(now);
        self.buckets.iter().fold((0.0, 0), |(cents, tokens), b| {
            (cents + b.cost_cents, tokens.saturating_add(b.tokens))
        })
    }

    /// Drops the minutes wholly before the window.
    fn evict(&mut self, now: Millis) {
        let since = Self::since(now);
        while self.buckets.front().is_some_and(|b| b.start < since) {
            self.buckets.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Millis = BUCKET_MS;

    #[test]
    fn sums_the_runs_of_the_last_day_by_the_minute() {
        let mut day = LastDay::default();
        let t0 = 100 * DAY_MS;
        day.record(t0, 10.0, 100);
        day.record(t0 + 10, 2.5, 50);
        day.record(t0 + 5 * MIN, 0.0, 7);
        day.record(t0 + 6 * MIN, 0.0, 0);
        assert_eq!(day.totals(t0 + 5 * MIN), (12.5, 157));
        assert_eq!(
            day.buckets.len(),
            2,
            "nothing is kept for a run that cost nothing"
        );
        // The first minute counts until it is wholly more than a day old.
        assert_eq!(day.totals(t0 + DAY_MS + MIN - 1), (12.5, 157));
        assert_eq!(day.totals(t0 + DAY_MS + MIN), (0.0, 7));
        assert_eq!(day.totals(t0 + 2 * DAY_MS), (0.0, 0));
        assert!(day.buckets.is_empty());
    }

    #[test]
    fn a_late_write_lands_in_its_own_minute() {
        let mut day = LastDay::default();
        let t0 = 100 * DAY_MS;
        day.record(t0 + 3 * MIN, 1.0, 1);
        day.record(t0 + MIN, 2.0, 2);
        day.record(t0 + 3 * MIN + 1, 4.0, 4);
        day.record(t0 + 2 * MIN, 8.0, 8);
        let starts: Vec<Millis> = day.buckets.iter().map(|b| b.start).collect();
        assert_eq!(starts, vec![t0 + MIN, t0 + 2 * MIN, t0 + 3 * MIN]);
        assert_eq!(day.totals(t0 + 3 * MIN), (15.0, 15));
        assert_eq!(day.totals(t0 + DAY_MS + 2 * MIN), (13.0, 13));
    }

    #[test]
    fn loads_what_the_store_summed_and_adds_to_it() {
        let mut day = LastDay::default();
        let now = 100 * DAY_MS;
        let stored = |start, cost_cents, tokens| UsageBucket {
            start,
            cost_cents,
            tokens,
        };
        assert_eq!(LastDay::since(now), now - DAY_MS);
        day.load(
            vec![
                stored(now - MIN, 3.0, 30),
                stored(now - 2 * DAY_MS, 100.0, 1000),
                stored(now - DAY_MS, 1.0, 10),
            ],
            now,
        );
        assert_eq!(day.totals(now), (4.0, 40));
        day.record(now - MIN + 5, 1.0, 1);
        assert_eq!(day.totals(now), (5.0, 41));
        assert_eq!(day.buckets.len(), 2);
    }
}
