//! What every benchmark uses: figures as median / p99 / max with a ratio to a floor, simulated
//! runners that speak the real runner protocol, an admin client, and readings of the server
//! process (CPU time, resident memory) from `/proc`.

use std::path::Path;
use std::time::{Duration, Instant};

use pipeline_proto::v1 as pb;
use pipeline_proto::v1::control_service_client::ControlServiceClient;
use pipeline_proto::v1::runner_service_client::RunnerServiceClient;
use pipeline_tests::fake_runner::authorized;
use tonic::transport::Channel;

/// Median, p99 and max of a set of durations.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub n: usize,
}

impl Summary {
    pub fn of(mut xs: Vec<Duration>) -> Self {
        assert!(!xs.is_empty(), "a figure needs at least one sample");
        xs.sort();
        let at = |q: f64| xs[((xs.len() as f64 - 1.0) * q).round() as usize];
        Self {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
            n: xs.len(),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {} p99 {} max {} (n = {})",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.n
        )
    }
}

/// A duration in milliseconds, three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Prints one figure: its distribution, and its median as a multiple of a floor's median.
pub fn report(name: &str, figure: Summary, floor: Option<(&str, Summary)>, goal: &str) {
    print!("{name}: {figure}");
    if let Some((what, floor)) = floor {
        print!(
            "; p50 = {:.2}x {what} (p50 {})",
            figure.p50.as_secs_f64() / floor.p50.as_secs_f64(),
            ms(floor.p50)
        );
    }
    println!("  [goal: {goal}]");
}

/// How a figure stands against its goal, as the figure lines print it.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// Prints one figure with its goal and whether it was met.
pub fn report_judged(name: &str, figure: Summary, goal: &str, met: bool) {
    println!("{name}: {figure}  [goal: {goal}: {}]", verdict(met));
}

/// Times `n` runs of `f`.
pub async fn time_each<F, Fut>(n: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut xs = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        f(i).await;
        xs.push(start.elapsed());
    }
    xs
}

/// A channel with the same transport settings as `pipeline-runner`.
pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .connect()
        .await
        .expect("connect to the server")
}

/// An admin client of the control API.
#[derive(Clone)]
pub struct Admin {
    pub client: ControlServiceClient<Channel>,
    pub token: String,
}

impl Admin {
    pub async fn connect(url: &str, token: String) -> Self {
        Self {
            client: ControlServiceClient::new(channel(url).await),
            token,
        }
    }

    pub async fn create(&mut self, title: String) -> String {
        self.client
            .create_task(authorized(
                &self.token,
                pb::CreateTaskRequest {
                    title,
                    ..Default::default()
                },
            ))
            .await
            .expect("create a task")
            .into_inner()
            .task
            .expect("the created task")
            .id
    }

    pub async fn status(&mut self) -> pb::GetStatusResponse {
        self.client
            .get_status(authorized(&self.token, pb::GetStatusRequest {}))
            .await
            .expect("status")
            .into_inner()
    }

    /// Creates the tasks in one `CreateTasks` call (all or none); returns their IDs.
    pub async fn create_batch(&mut self, tasks: Vec<pb::CreateTaskRequest>) -> Vec<String> {
        self.client
            .create_tasks(authorized(&self.token, pb::CreateTasksRequest { tasks }))
            .await
            .expect("create a batch of tasks")
            .into_inner()
            .tasks
            .into_iter()
            .map(|t| t.id)
            .collect()
    }

    /// Creates `n` tasks, `make(i)` the i-th, in `CreateTasks` calls of `batch`, two calls in
    /// flight (one is encoded while the other is written); returns how many were created.
    pub async fn seed(
        &self,
        n: usize,
        batch: usize,
        make: impl Fn(usize) -> pb::CreateTaskRequest + Send + Sync + 'static,
    ) -> usize {
        let make = std::sync::Arc::new(make);
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..2 {
            let (mut admin, make, next) = (self.clone(), make.clone(), next.clone());
            handles.push(tokio::spawn(async move {
                let mut created = 0;
                loop {
                    let from = next.fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
                    if from >= n {
                        return created;
                    }
                    let tasks = (from..(from + batch).min(n)).map(|i| make(i)).collect();
                    created += admin.create_batch(tasks).await.len();
                }
            }));
        }
        let mut created = 0;
        for h in handles {
            created += h.await.expect("seeder");
        }
        created
    }

    /// One page of `ListTasks`: the tasks and the next page's token (empty after the last).
    pub async fn list_page(
        &mut self,
        status: Option<pb::TaskStatus>,
        page_token: String,
        page_size: u32,
    ) -> (Vec<pb::Task>, String) {
        let r = self
            .client
            .list_tasks(authorized(
                &self.token,
                pb::ListTasksRequest {
                    status: status.map(|s| s as i32),
                    page_size,
                    page_token,
                    parent: None,
                },
            ))
            .await
            .expect("list tasks")
            .into_inner();
        (r.tasks, r.next_page_token)
    }

    pub async fn cancel(&mut self, id: &str) {
        self.client
            .cancel_task(authorized(
                &self.token,
                pb::CancelTaskRequest { id: id.to_owned() },
            ))
            .await
            .expect("cancel a task");
    }

    /// Every transition from now on, each with the instant it arrived.
    pub async fn watch(
        &mut self,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(Instant, pb::TaskTransition)> {
        let mut stream = self
            .client
            .watch(authorized(
                &self.token,
                pb::WatchRequest {
                    after_event: None,
                    after_at_ms: None,
                },
            ))
            .await
            .expect("watch")
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(t)) = stream.message().await {
                // The first message only says where the stream starts.
                if t.task_id.is_empty() {
                    continue;
                }
                if tx.send((Instant::now(), t)).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Creates `n` tasks, `concurrency` calls at a time; returns their IDs.
    pub async fn create_many(&self, n: usize, concurrency: usize, prefix: &str) -> Vec<String> {
        let mut handles = Vec::new();
        for c in 0..concurrency {
            let mut admin = self.clone();
            let prefix = prefix.to_owned();
            handles.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (c..n).step_by(concurrency) {
                    ids.push(admin.create(format!("{prefix} {i}")).await);
                }
                ids
            }));
        }
        let mut ids = Vec::new();
        for h in handles {
            ids.extend(h.await.expect("creator"));
        }
        ids
    }
}

/// Waits for the transition of `task` to `status` on a watch stream.
pub async fn wait_transition(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, pb::TaskTransition)>,
    mut pred: impl FnMut(&pb::TaskTransition) -> bool,
) -> (Instant, pb::TaskTransition) {
    loop {
        let got = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("a transition within 120 s")
            .expect("the watch stream is open");
        if pred(&got.1) {
            return got;
        }
    }
}

/// A simulated runner: the real protocol, no agent.
#[derive(Clone)]
pub struct Sim {
    pub client: RunnerServiceClient<Channel>,
    pub id: String,
    pub credential: String,
    /// How often the server asked this runner to heartbeat.
    pub heartbeat_interval: Duration,
}

impl Sim {
    pub async fn register(channel: Channel, token: &str, name: &str, slots: u32) -> Self {
        let mut client = RunnerServiceClient::new(channel);
        let r = client
            .register(authorized(
                token,
                pb::RegisterRequest {
                    name: name.to_owned(),
                    labels: vec![],
                    slots,
                    version: "bench".into(),
                    protocol_version: pipeline_proto::PROTOCOL_VERSION,
                    ..Default::default()
                },
            ))
            .await
            .expect("register")
            .into_inner();
        Self {
            client,
            id: r.runner_id,
            credential: r.credential.unwrap_or_default(),
            heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
        }
    }

    pub fn auth<T>(&self, message: T) -> tonic::Request<T> {
        authorized(&self.credential, message)
    }

    /// Opens the work stream (after its `Attached` answer).
    pub async fn open(&mut self) -> tonic::Streaming<pb::WorkMessage> {
        let req = self.auth(pb::OpenWorkRequest {
            runner_id: self.id.clone(),
            held: vec![],
            draining: false,
            unhealthy: None,
        });
        let mut work = self
            .client
            .open_work(req)
            .await
            .expect("open work")
            .into_inner();
        work.message().await.expect("attached");
        work
    }

    /// Opens the work stream and forwards each assignment, with the instant it arrived.
    pub async fn forward_assignments(
        &mut self,
        tx: tokio::sync::mpsc::UnboundedSender<(Instant, pb::Assignment)>,
    ) {
        let mut work = self.open().await;
        tokio::spawn(async move {
            while let Ok(Some(m)) = work.message().await {
                if let Some(pb::work_message::Kind::Assignment(a)) = m.kind
                    && tx.send((Instant::now(), a)).is_err()
                {
                    return;
                }
            }
        });
    }

    /// Opens the heartbeat stream, as `pipeline-runner` does once connected.
    pub async fn beats(&mut self) -> Beats {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = self.auth(tokio_stream::wrappers::ReceiverStream::new(rx));
        let replies = self
            .client
            .heartbeats(req)
            .await
            .expect("heartbeat stream")
            .into_inner();
        Beats {
            id: self.id.clone(),
            tx,
            replies,
        }
    }

    /// Sends a result with the commit's bundle.
    pub async fn complete(
        &mut self,
        lease: pb::LeaseRef,
        outcome: pb::LeaseOutcome,
        commit: Option<String>,
        bundle: Vec<u8>,
    ) {
        let messages = pipeline_tests::fake_runner::complete_messages(
            &self.id, lease, outcome, None, 0.0, commit, bundle,
        );
        let req = self.auth(tokio_stream::iter(messages));
        self.client.complete_lease(req).await.expect("complete");
    }
}

/// A simulated runner's heartbeat stream.
pub struct Beats {
    id: String,
    tx: tokio::sync::mpsc::Sender<pb::HeartbeatRequest>,
    replies: tonic::Streaming<pb::HeartbeatResponse>,
}

impl Beats {
    /// One heartbeat and its reply; false if the server did not answer (it is gone).
    pub async fn beat(&mut self, held: Vec<pb::LeaseRef>) -> bool {
        let req = pb::HeartbeatRequest {
            runner_id: self.id.clone(),
            held,
            draining: false,
            unhealthy: None,
        };
        self.tx.send(req).await.is_ok() && matches!(self.replies.message().await, Ok(Some(_)))
    }
}

/// Registers `n` simulated runners named `<prefix>-<i>` with `slots` each, each on its own
/// connection, 32 connecting at a time (as a fleet starting up would, without overflowing the
/// listen backlog).
pub async fn register_sims(url: &str, token: &str, prefix: &str, n: usize, slots: u32) -> Vec<Sim> {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut handles = Vec::new();
    for i in 0..n {
        let url = url.to_owned();
        let token = token.to_owned();
        let name = format!("{prefix}-{i}");
        let gate = std::sync::Arc::clone(&gate);
        handles.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            Sim::register(channel(&url).await, &token, &name, slots).await
        }));
    }
    let mut sims = Vec::new();
    for h in handles {
        sims.push(h.await.expect("register"));
    }
    sims
}

/// The server process's CPU time (user + system) so far.
pub fn cpu_time(pid: u32) -> Duration {
    cpu_times(pid).0
}

/// A process's own CPU time (user + system) so far, and that of its children it has waited
/// for (the server's git processes).
pub fn cpu_times(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields[i]
            .parse::<u64>()
            .expect("a tick count in /proc stat")
    };
    let secs = |t: u64| Duration::from_secs_f64(t as f64 / clock_ticks() as f64);
    (secs(ticks(11) + ticks(12)), secs(ticks(13) + ticks(14)))
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// The server process's resident memory, in bytes (and its peak).
pub fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    (
        memory_field(&status, "VmRSS:"),
        memory_field(&status, "VmHWM:"),
    )
}

/// A memory field of `/proc/<pid>/status` (in kB there), in bytes; 0 when absent.
fn memory_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Runs git in `dir`; panics with its stderr if it fails; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    pipeline_tests::git(dir, args)
}

/// A bare clone of `repo` at `dest`.
pub fn bare_clone(repo: &Path, dest: &Path) {
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let parent = dest.parent().expect("a parent dir");
    git(parent, &["clone", "-q", "--bare", &path(repo), &path(dest)]);
}

/// Runs `cmd` to its end, reading its peak resident memory (`VmHWM` in `/proc/<pid>/status`,
/// a high-water mark) every 5 ms while it runs; returns its exit status, that peak in bytes
/// and how long it ran. Only growth in its last 5 ms could go unseen.
pub fn run_watching_memory(
    cmd: &mut std::process::Command,
) -> (std::process::ExitStatus, u64, Duration) {
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut peak = 0;
    loop {
        // A process that has exited but is not yet reaped has no memory figures left.
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
            peak = peak.max(memory_field(&status, "VmHWM:"));
        }
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return (status, peak, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
