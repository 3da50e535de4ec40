//! The page's small charts, as inline SVG drawn here (numbers only; nothing a task or an agent
//! wrote reaches them), and the figures rolled in memory that some of them need.
//!
//! Where each figure comes from, none of them a scan of the tasks: tasks landed per hour and
//! builds per landed task from the last day's trains (`trains_since`, by the index
//! `trains_by_end`); agent cost per day from the runs' usage (`usage_since`, as `usage.rs`
//! loads it); queue depth from the counts in memory, sampled at each transition into
//! [`Rolling`] (so its history starts when the server does).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::domain::{Millis, TaskId, TaskStatus};
use crate::store::Store;

const HOUR: Millis = 3_600_000;
const DAY: Millis = 24 * HOUR;

/// Figures kept in memory for the page.
#[derive(Debug, Default)]
pub struct Rolling {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The most unfinished tasks (open, in progress, verified) seen in each hour.
    depth: BTreeMap<Millis, u64>,
    /// The tasks landed most recently, newest last.
    landed: VecDeque<(TaskId, Millis)>,
}

/// How many recently landed tasks the queue page shows.
pub const RECENT: usize = 10;

impl Rolling {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn note_depth(&self, at: Millis, depth: u64) {
        let mut inner = self.lock();
        let hour = at - at.rem_euclid(HOUR);
        let slot = inner.depth.entry(hour).or_default();
        *slot = (*slot).max(depth);
        inner.depth.retain(|h, _| *h > hour - DAY);
    }

    pub fn note_landed(&self, task: TaskId, at: Millis) {
        let mut inner = self.lock();
        inner.landed.retain(|(t, _)| *t != task);
        inner.landed.push_back((task, at));
        while inner.landed.len() > RECENT {
            inner.landed.pop_front();
        }
    }

    /// The tasks landed most recently, newest first.
    pub fn landed(&self) -> Vec<(TaskId, Millis)> {
        self.lock().landed.iter().rev().cloned().collect()
    }

    /// The most unfinished tasks in each of the last 24 hours (none: not known).
    pub fn depth(&self, now: Millis) -> Vec<Option<f64>> {
        let inner = self.lock();
        let this_hour = now - now.rem_euclid(HOUR);
        (0..24)
            .rev()
            .map(|i| inner.depth.get(&(this_hour - i * HOUR)).map(|d| *d as f64))
            .collect()
    }
}

/// Keeps [`Rolling`] up to date from the feed's task transitions (seeded with the last ones stored), until
/// `stop`.
pub async fn follow<S: Store>(
    coordinator: Arc<crate::coordinator::Coordinator<S, crate::repo::Repo>>,
    rolling: Arc<super::Web<S>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut live = coordinator.store().feed().subscribe();
    let sample = |at: Millis| {
        let coordinator = Arc::clone(&coordinator);
        let web = Arc::clone(&rolling);
        async move {
            if let Ok(s) = coordinator.status().await {
                let c = s.counts;
                web.rolling
                    .note_depth(at, c.open + c.in_progress + c.verified);
            }
        }
    };
    let store = coordinator.store();
    if let Ok(last) = store.last_event_id().await
        && let Ok(recent) = store.events_after((last - 5_000).max(0), 5_000).await
    {
        for e in recent.into_iter().filter(|e| e.to == TaskStatus::Done) {
            rolling.rolling.note_landed(e.task_id.clone(), e.at);
        }
    }
    sample(coordinator.now()).await;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = live.recv() => event,
        };
        match event {
            Ok(entry) => {
                // Only a task's transitions move the figures.
                let Some(e) = entry.task_event() else {
                    continue;
                };
                if e.to == TaskStatus::Done {
                    rolling.rolling.note_landed(e.task_id.clone(), e.at);
                }
                sample(e.at).await;
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                sample(coordinator.now()).await;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// A chart as the page shows it: a title, its latest figure, and the SVG.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: &'static str,
    pub figure: String,
    pub svg: String,
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Bars for `values` (oldest first; `None` is no figure), `labels` under the first, middle and
/// last bars.
pub fn bars(title: &'static str, values: &[Option<f64>], unit: &str, labels: [&str; 3]) -> Chart {
    const W: f64 = 240.0;
    const H: f64 = 64.0;
    let max = values.iter().flatten().copied().fold(0.0_f64, f64::max);
    let n = values.len().max(1) as f64;
    let step = W / n;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {}\" width=\"{W}\" height=\"{}\" role=\"img\" \
         aria-label=\"{title}\">",
        H + 14.0,
        H + 14.0
    );
    svg.push_str(&format!(
        "<line class=\"axis\" x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\"/>"
    ));
    for (i, v) in values.iter().enumerate() {
        let x = i as f64 * step + 1.0;
        match v {
            Some(v) => {
                let h = if max > 0.0 {
                    (v / max) * (H - 4.0)
                } else {
                    0.0
                };
                let h = if *v > 0.0 { h.max(1.5) } else { 0.0 };
                svg.push_str(&format!(
                    "<rect class=\"bar\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\">\
                     <title>{} {unit}</title></rect>",
                    H - h,
                    (step - 2.0).max(1.0),
                    fmt_num(*v)
                ));
            }
            None => svg.push_str(&format!(
                "<rect class=\"bar none\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"1\"/>",
                H - 1.0,
                (step - 2.0).max(1.0)
            )),
        }
    }
    for (label, x, anchor) in [
        (labels[0], 0.0, "start"),
        (labels[1], W / 2.0, "middle"),
        (labels[2], W, "end"),
    ] {
        svg.push_str(&format!(
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
            H + 12.0,
            escape(label)
        ));
    }
    svg.push_str(&format!(
        "<text class=\"max\" x=\"0\" y=\"9\" text-anchor=\"start\">max {}</text></svg>",
        fmt_num(max)
    ));
    let figure = values
        .iter()
        .rev()
        .flatten()
        .next()
        .map_or_else(|| "-".to_owned(), |v| format!("{} {unit}", fmt_num(*v)));
    Chart { title, figure, svg }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The four charts of the queue page.
pub async fn charts<S: Store>(app: &super::App<S>) -> Vec<Chart> {
    let now = app.coordinator.now();
    let this_hour = now - now.rem_euclid(HOUR);
    let first_hour = this_hour - 23 * HOUR;
    let mut landed = vec![0.0; 24];
    let mut builds = vec![0.0; 24];
    if let Ok(trains) = app.coordinator.store().trains_since(first_hour).await {
        for t in trains {
            let i = ((t.ended_at - first_hour) / HOUR).clamp(0, 23) as usize;
            landed[i] += f64::from(t.landed);
            builds[i] += f64::from(t.builds);
        }
    }
    let per_landed: Vec<Option<f64>> = landed
        .iter()
        .zip(&builds)
        .map(|(l, b)| (*l > 0.0).then(|| b / l))
        .collect();
    let today = now - now.rem_euclid(DAY);
    let first_day = today - 13 * DAY;
    let mut cost = vec![Some(0.0); 14];
    if let Ok(buckets) = app.coordinator.store().usage_since(first_day, DAY).await {
        for b in buckets {
            let i = ((b.start - first_day) / DAY).clamp(0, 13) as usize;
            if let Some(c) = cost[i].as_mut() {
                *c += b.cost_cents;
            }
        }
    }
    let hours = ["24 h ago", "12 h", "now"];
    vec![
        bars(
            "tasks landed per hour",
            &landed.into_iter().map(Some).collect::<Vec<_>>(),
            "landed",
            hours,
        ),
        bars(
            "queue depth (unfinished tasks)",
            &app.rolling.depth(now),
            "tasks",
            hours,
        ),
        bars("builds per landed task", &per_landed, "builds", hours),
        bars(
            "agent cost per day (cents)",
            &cost,
            "cents",
            ["14 days ago", "7 days", "today"],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_scaled_to_the_largest_and_say_the_latest() {
        let c = bars("t", &[Some(1.0), None, Some(4.0)], "x", ["a", "b", "<c>"]);
        assert_eq!(c.figure, "4 x");
        assert_eq!(c.svg.matches("class=\"bar\"").count(), 2);
        assert!(c.svg.contains("class=\"bar none\""));
        assert!(c.svg.contains("&lt;c&gt;") && !c.svg.contains("<c>"));
        assert!(c.svg.contains("max 4"));
    }

    #[test]
    fn depth_is_kept_per_hour_for_a_day() {
        let r = Rolling::default();
        r.note_depth(0, 3);
        r.note_depth(10, 5);
        r.note_depth(HOUR + 1, 2);
        let d = r.depth(HOUR + 2);
        assert_eq!(d.len(), 24);
        assert_eq!(d[22], Some(5.0));
        assert_eq!(d[23], Some(2.0));
        r.note_depth(30 * HOUR, 1);
        assert_eq!(
            r.depth(30 * HOUR).iter().flatten().count(),
            1,
            "older hours dropped"
        );
    }
}
