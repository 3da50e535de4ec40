//! The runner API of the coordinator: registration (a name belongs to its credential), work
//! streams and heartbeats (memory only), the fence on every message about a lease, base
//! bundles out, results and commits in (judged by [`crate::lifecycle::judge`]), releases, and
//! the lease-checked ingestion of log lines.

use std::path::Path;

use pipeline_core::git::RefName;
use pipeline_core::ids::CommitId;
use tokio::sync::mpsc;

use crate::auth::Caller;
use crate::domain::{LogLine, LogStream, Millis, Phase, RunEnd, Task, TaskId};
use crate::error::{Error, Result};
use crate::feed::{NewEntry, Topic};
use crate::landing;
use crate::lifecycle::Event;
use crate::lifecycle::judge::{Judgement, Outcome, Received, RunnerResult, judge};
use crate::logs::cut_line;
use crate::ports::Repository;
use crate::scheduler::registry::{LeaseRef, LiveLease, Push};
use crate::store::{NewRun, Store};

use super::Coordinator;

/// The largest number of slots one runner may announce.
pub const MAX_SLOTS: u32 = 64;
/// How many pushes may wait for a slow runner before its stream counts as broken.
const PUSH_BUFFER: usize = 64;

/// What a runner says about itself when it registers.
#[derive(Clone, Debug)]
pub struct RunnerHello {
    pub name: String,
    pub labels: Vec<String>,
    /// The work it takes.
    pub scope: crate::domain::Scope,
    pub slots: u32,
    pub version: String,
    pub protocol_version: u32,
    /// The sandbox its agents and builds run in, if it said.
    pub sandbox: Option<pipeline_core::sandbox::Kind>,
}

/// The server's answer to a registration.
#[derive(Clone, Debug)]
pub struct Registered {
    pub runner_id: String,
    pub heartbeat_interval_ms: u64,
    pub lease_ttl_ms: u64,
    /// The runner's own credential, issued when it registered with the registration token.
    pub credential: Option<String>,
}

/// What became of the leases a runner reported when it opened its work stream.
#[derive(Clone, Debug, Default)]
pub struct Attached {
    pub kept: Vec<LeaseRef>,
    pub dropped: Vec<LeaseRef>,
}

/// A runner's result for a lease: what it reported, and the commit it sent (checked when it
/// is received).
#[derive(Clone, Debug)]
pub struct LeaseResult {
    pub lease: LeaseRef,
    pub result: RunnerResult,
    pub commit: Option<CommitId>,
}

/// A runner name: like a task ID, safe in logs, paths and messages.
fn check_runner_name(name: &str) -> Result<()> {
    pipeline_core::ids::RunnerName::parse(name)
        .map(drop)
        .map_err(Error::from)
}

/// A runner ID the server does not know (it restarted): the runner registers again and
/// retries, so this is `NotFound`, never a refusal of its leases.
pub fn unregistered(runner_id: &str) -> Error {
    Error::NotFound(format!(
        "runner {runner_id} is not registered (the server may have restarted); register again"
    ))
}

pub(super) fn refused(lease: &LeaseRef, why: impl std::fmt::Display) -> Error {
    Error::FailedPrecondition(format!(
        "lease {} (epoch {}) is no longer yours: {why}; drop the work",
        lease.id, lease.epoch
    ))
}

/// `meta` keys of the runners drained from the control plane: this prefix and the name.
const HELD_PREFIX: &str = "runner_held:";

impl<S: Store, R: Repository> Coordinator<S, R> {
    /// Registers a runner and tells it how often to heartbeat. The registration token gets the
    /// runner a credential of its own; a runner's credential may register again only under its
    /// own name (after a restart of either side).
    pub async fn register(&self, hello: RunnerHello, caller: &Caller) -> Result<Registered> {
        let issue = match caller {
            Caller::Registration => {
                // Names reserved by registrations whose runners never connected are freed
                // after a while (`--free-unconnected-names-after`); those due go now.
                for name in self.auth.free_unconnected(&self.store, self.now()).await? {
                    tracing::info!(
                        runner = %name,
                        "freed the runner name: it was registered but its runner never connected"
                    );
                }
                // A name belongs to the credential that registered it: the shared token cannot
                // take it over (a runner that lost its saved credential is revoked, then
                // forgotten, to free its name).
                if self.auth.is_revoked(&hello.name) {
                    return Err(Error::PermissionDenied(format!(
                        "runner {} was revoked; an admin can free the name with \
                         `pipelinectl runners forget {}`",
                        hello.name, hello.name
                    )));
                }
                if self.auth.name_taken(&hello.name) {
                    return Err(Error::PermissionDenied(format!(
                        "the runner name {} belongs to a registered runner: register with its \
                         own credential (the runner keeps it in its work dir), use another \
                         --name, or have an admin revoke and forget {}",
                        hello.name, hello.name
                    )));
                }
                self.auth.count_registration("registration token")?;
                true
            }
            Caller::Runner(name) if *name == hello.name => {
                self.auth.count_registration(name)?;
                false
            }
            Caller::Runner(name) => {
                return Err(Error::PermissionDenied(format!(
                    "this credential belongs to runner {name}; it cannot register as {}",
                    hello.name
                )));
            }
            Caller::Admin | Caller::Viewer => {
                return Err(Error::PermissionDenied(
                    "the admin and viewer tokens cannot register a runner; use the runner \
                     registration token"
                        .to_owned(),
                ));
            }
        };
        if hello.protocol_version != pipeline_proto::PROTOCOL_VERSION {
            return Err(Error::FailedPrecondition(format!(
                "this runner speaks protocol version {} but the server speaks {}: run the same \
                 pipeline release on both",
                hello.protocol_version,
                pipeline_proto::PROTOCOL_VERSION
            )));
        }
        check_runner_name(&hello.name)?;
        if hello.slots == 0 || hello.slots > MAX_SLOTS {
            return Err(Error::InvalidArgument(format!(
                "a runner needs 1 to {MAX_SLOTS} slots, not {}",
                hello.slots
            )));
        }
        let ttl = self.settings.lease_ttl_ms;
        let entry = NewEntry::new(
            Topic::Runner,
            hello.name.clone(),
            "registered",
            self.now(),
            format!(
                "runner {} registered with {} slots",
                hello.name, hello.slots
            ),
            serde_json::json!({
                "slots": hello.slots,
                "labels": hello.labels.clone(),
                "version": hello.version.clone(),
            }),
        );
        let runner_id = self
            .registry()
            .register(
                &hello.name,
                hello.labels,
                hello.slots,
                hello.version,
                self.now(),
            )
            .map_err(Error::AlreadyExists)?;
        self.note(entry);
        self.registry().set_scope(&runner_id, hello.scope);
        self.registry().set_sandbox(&runner_id, hello.sandbox);
        let credential = if issue {
            Some(
                self.auth
                    .issue(&self.store, &hello.name, self.now())
                    .await?,
            )
        } else {
            None
        };
        tracing::info!(runner = %hello.name, %runner_id, slots = hello.slots, "runner registered");
        Ok(Registered {
            runner_id,
            heartbeat_interval_ms: (ttl / 3).max(1) as u64,
            lease_ttl_ms: ttl as u64,
            credential,
        })
    }

    /// Checks that `caller` is the runner `runner_id` (a runner acts only for itself).
    pub fn authorize_runner(&self, caller: &Caller, runner_id: &str) -> Result<()> {
        let Caller::Runner(name) = caller else {
            return Err(Error::PermissionDenied(
                "only a runner's own credential may use the runner API".to_owned(),
            ));
        };
        match self.registry().runner(runner_id) {
            None => Err(unregistered(runner_id)),
            Some(r) if r.name == *name => Ok(()),
            Some(r) => Err(Error::PermissionDenied(format!(
                "runner {name} may act only for itself, not for runner {}",
                r.name
            ))),
        }
    }

    /// Cuts runner `name` off: its credential stops working, its work stream closes, and its
    /// leases go back to Open (not counted against their tasks). Returns how many.
    pub async fn revoke(&self, name: &str) -> Result<u32> {
        check_runner_name(name)?;
        let entry = NewEntry::new(
            Topic::Runner,
            name,
            "revoked",
            self.now(),
            format!("runner {name} revoked: its credential no longer works and its leases go back"),
            serde_json::json!({}),
        );
        let had_credential = self.auth.revoke(&self.store, name, &entry).await?;
        for id in self.runner_ids(name) {
            self.lose_builds_of(&id, "was revoked");
        }
        let leases = self.registry().disconnect(name);
        if !had_credential && leases.is_none() {
            return Err(Error::NotFound(format!("no runner named {name}")));
        }
        let mut released = 0;
        for (lease_id, live) in leases.unwrap_or_default() {
            let lease = LeaseRef {
                id: lease_id,
                epoch: live.epoch,
            };
            let event = Event::Released {
                reason: format!("runner {name} was revoked"),
                infrastructure: false,
            };
            let Ok(task) = self.get(&live.task).await else {
                continue;
            };
            if self
                .transition_from(task, &event, |t| lease_matches(t, &lease), |_, _| {})
                .await
                .is_ok()
            {
                released += 1;
            }
        }
        tracing::warn!(runner = name, released, "runner revoked");
        Ok(released)
    }

    /// Forgets registrations that never open a work stream after `ms` (see the registry).
    pub fn forget_unopened_after(&self, ms: Millis) {
        self.registry().set_forget_unopened_after(ms);
    }

    /// Drains runner `name` from the control plane (`drain`), or lets it take work again: it
    /// finishes what it holds and gets nothing new, also after it reconnects or the server
    /// restarts (the hold is written to `meta` first). Refused for a name no runner has.
    pub async fn hold_runner(&self, name: &str, drain: bool) -> Result<()> {
        check_runner_name(name)?;
        let known = self.registry().runners().iter().any(|r| r.name == name);
        if !known {
            return Err(Error::NotFound(format!(
                "no runner named {name} (pipelinectl runners lists them)"
            )));
        }
        let key = format!("{HELD_PREFIX}{name}");
        let (kind, said) = if drain {
            (
                "drained",
                "drained from the control plane: it takes no new work",
            )
        } else {
            ("undrained", "takes work again")
        };
        let entry = NewEntry::new(
            Topic::Runner,
            name,
            kind,
            self.now(),
            format!("runner {name} {said}"),
            serde_json::json!({ "draining": drain }),
        );
        // The registry follows the write: the dispatcher, woken by its entry, waits for it.
        let _ticket = self.following();
        self.store
            .set_meta_recording(&key, drain.then_some("1"), &entry)
            .await?;
        self.registry().hold(name, drain);
        if drain {
            for id in self.runner_ids(name) {
                self.lose_builds_of(&id, "was drained");
            }
        }
        tracing::info!(runner = name, drain, "runner held from the control plane");
        Ok(())
    }

    /// Loads the runners drained from the control plane (at start-up).
    pub async fn load_held_runners(&self) -> Result<()> {
        for (key, _) in self.store.list_meta(HELD_PREFIX).await? {
            if let Some(name) = key.strip_prefix(HELD_PREFIX) {
                self.registry().hold(name, true);
            }
        }
        Ok(())
    }

    /// Forgets runner `name`, which must not be connected: it leaves the list and its name is
    /// free again (its credential, if any, stops working; a revoked name may be registered
    /// again).
    pub async fn forget(&self, name: &str) -> Result<()> {
        check_runner_name(name)?;
        if self
            .registry()
            .runners()
            .iter()
            .any(|r| r.name == name && r.connected)
        {
            return Err(Error::FailedPrecondition(format!(
                "runner {name} is connected; stop it (or revoke it) first"
            )));
        }
        let known = self.registry().forget(name);
        if !known && !self.auth.knows(name) {
            return Err(Error::NotFound(format!("no runner named {name}")));
        }
        let entry = NewEntry::new(
            Topic::Runner,
            name,
            "forgotten",
            self.now(),
            format!("runner {name} forgotten: its name is free again"),
            serde_json::json!({}),
        );
        self.auth.forget(&self.store, name, &entry).await?;
        // A forgotten name starts afresh: not drained.
        self.store
            .delete_meta(&format!("{HELD_PREFIX}{name}"))
            .await?;
        self.registry().hold(name, false);
        tracing::warn!(runner = name, "runner forgotten; its name is free");
        Ok(())
    }

    /// Replaces the runner registration token; returns it and where it is kept.
    pub async fn rotate_registration_token(&self) -> Result<(String, std::path::PathBuf)> {
        let token = self.auth.rotate_registration(&self.store).await?;
        tracing::warn!(
            path = %self.auth.registration_file.display(),
            "runner registration token replaced"
        );
        Ok((token, self.auth.registration_file.clone()))
    }

    /// Replaces the viewer token and ends the page's sessions the old one opened; returns the
    /// new token, where it is kept, and how many sessions ended.
    pub async fn rotate_viewer_token(&self) -> Result<(String, std::path::PathBuf, u64)> {
        let (token, ended) = self.auth.rotate_viewer(&self.store).await?;
        tracing::warn!(
            path = %self.auth.viewer_file.display(),
            sessions_ended = ended,
            "viewer token replaced"
        );
        Ok((token, self.auth.viewer_file.clone(), ended))
    }

    /// Opens a runner's work stream: re-attaches the leases it still holds (after a reconnect)
    /// and returns the receiving end of its pushes, with the stream's generation. The first
    /// time a runner does, its name stops being one whose runner never connected.
    pub async fn open_work(
        &self,
        runner_id: &str,
        held: &[LeaseRef],
        draining: bool,
        unhealthy: Option<String>,
    ) -> Result<(u64, Attached, mpsc::Receiver<Push>)> {
        let name = self.registry().runner(runner_id).map(|r| r.name.clone());
        if let Some(name) = name {
            self.auth.connected(&self.store, &name).await?;
        }
        let (tx, rx) = mpsc::channel(PUSH_BUFFER);
        let now = self.now();
        let mut registry = self.registry();
        let generation = registry
            .attach(runner_id, tx, draining, unhealthy)
            .ok_or_else(|| unregistered(runner_id))?;
        let mut attached = Attached::default();
        for lease in held {
            if registry.reattach(runner_id, lease, now, self.settings.lease_ttl_ms) {
                attached.kept.push(lease.clone());
            } else {
                attached.dropped.push(lease.clone());
            }
        }
        let name = registry.runner(runner_id).map(|r| r.name.clone());
        drop(registry);
        if let Some(name) = name {
            self.note(NewEntry::new(
                Topic::Runner,
                name.clone(),
                "connected",
                now,
                format!("runner {name} connected"),
                serde_json::json!({
                    "kept": attached.kept.len(),
                    "dropped": attached.dropped.len(),
                }),
            ));
        }
        tracing::info!(
            %runner_id,
            kept = attached.kept.len(),
            dropped = attached.dropped.len(),
            "runner connected"
        );
        Ok((generation, attached, rx))
    }

    /// The IDs of the runners called `name`.
    fn runner_ids(&self, name: &str) -> Vec<String> {
        self.registry()
            .runners()
            .into_iter()
            .filter(|r| r.name == name)
            .map(|r| r.id)
            .collect()
    }

    /// The work stream of `generation` ended.
    pub fn close_work(&self, runner_id: &str, generation: u64) {
        let name = {
            let mut registry = self.registry();
            // Only when this stream was the runner's (a newer one may have replaced it).
            registry
                .detach(runner_id, generation)
                .then(|| registry.runner(runner_id).map(|r| r.name.clone()))
                .flatten()
        };
        if name.is_some() {
            // A build job is not kept over a reconnect: it is built elsewhere at once.
            self.lose_builds_of(runner_id, "disconnected");
        }
        if let Some(name) = name {
            self.note(NewEntry::new(
                Topic::Runner,
                name.clone(),
                "disconnected",
                self.now(),
                format!("runner {name} disconnected"),
                serde_json::json!({}),
            ));
        }
        tracing::info!(%runner_id, "runner disconnected");
    }

    /// The feed entry of a runner's health changing to `unhealthy` (`None`: healthy again).
    fn health_entry(&self, name: &str, unhealthy: Option<&str>) -> NewEntry {
        let (kind, message) = match unhealthy {
            Some(why) => (
                "unhealthy",
                format!("runner {name} unhealthy, taking no work: {why}"),
            ),
            None => ("healthy", format!("runner {name} healthy again")),
        };
        NewEntry::new(
            Topic::Runner,
            name,
            kind,
            self.now(),
            message,
            serde_json::json!({
                "health": if unhealthy.is_some() { "unhealthy" } else { "healthy" },
                "health_reason": unhealthy,
            }),
        )
    }

    /// The runner says it takes no more work (before it gives a lease back).
    pub fn runner_unhealthy(&self, runner_id: &str, why: String) {
        let mut registry = self.registry();
        if let Some(r) = registry.runner_mut(runner_id)
            && r.unhealthy.is_none()
        {
            tracing::error!(runner = %r.name, "runner unhealthy, taking no work: {why}");
            let entry = self.health_entry(&r.name, Some(&why));
            r.unhealthy = Some(why);
            drop(registry);
            self.note(entry);
        }
    }

    /// Renews the runner's leases; returns those it must drop. The runner also says whether it
    /// drains and whether it is unhealthy (then it takes no work).
    pub fn heartbeat(
        &self,
        runner_id: &str,
        held: &[LeaseRef],
        draining: bool,
        unhealthy: Option<String>,
    ) -> Result<Vec<LeaseRef>> {
        let mut registry = self.registry();
        let was = registry
            .runner(runner_id)
            .map(|r| (r.unhealthy.is_some(), r.draining));
        if let Some(why) = &unhealthy
            && let Some(r) = registry.runner(runner_id)
            && r.unhealthy.is_none()
        {
            tracing::error!(runner = %r.name, "runner unhealthy, taking no work: {why}");
        }
        let dropped = registry
            .heartbeat(
                runner_id,
                held,
                draining,
                unhealthy,
                self.now(),
                self.settings.lease_ttl_ms,
            )
            .ok_or_else(|| unregistered(runner_id))?;
        // A change of health or of the runner's own drain is a feed entry (queued: a
        // heartbeat never waits on the database; memory has changed first, so the entry
        // wakes the dispatcher when slots free); an unchanged one is nothing.
        let mut lose_builds = false;
        let changes = match (was, registry.runner(runner_id)) {
            (Some((was_unhealthy, was_draining)), Some(r)) => {
                let mut changes = Vec::new();
                if was_unhealthy != r.unhealthy.is_some() {
                    changes.push(self.health_entry(&r.name, r.unhealthy.as_deref()));
                }
                if !was_draining && r.draining {
                    lose_builds = true;
                    changes.push(NewEntry::new(
                        Topic::Runner,
                        r.name.clone(),
                        "draining",
                        self.now(),
                        format!(
                            "runner {} drains: it finishes its work and takes no more",
                            r.name
                        ),
                        serde_json::json!({ "draining": true }),
                    ));
                }
                if was_draining && !r.draining {
                    changes.push(NewEntry::new(
                        Topic::Runner,
                        r.name.clone(),
                        "undrained",
                        self.now(),
                        format!("runner {} no longer drains: it takes work again", r.name),
                        serde_json::json!({ "draining": false }),
                    ));
                }
                changes
            }
            _ => Vec::new(),
        };
        drop(registry);
        if lose_builds {
            self.lose_builds_of(runner_id, "drains");
        }
        for entry in changes {
            self.note(entry);
        }
        Ok(dropped)
    }

    /// Checks that `lease` is live and `runner_id`'s, in memory only (no database round trip);
    /// returns the task it is for.
    pub fn check_live_lease(&self, runner_id: &str, lease: &LeaseRef) -> Result<TaskId> {
        let registry = self.registry();
        if registry.runner(runner_id).is_none() {
            return Err(unregistered(runner_id));
        }
        let live = registry
            .check(runner_id, lease, self.now())
            .map_err(|why| refused(lease, why))?;
        Ok(live.task.clone())
    }

    /// Checks that `lease` is live and `runner_id`'s, in memory and in the database; returns the
    /// task it is for.
    pub async fn check_lease(&self, runner_id: &str, lease: &LeaseRef) -> Result<Task> {
        let task_id = self.check_live_lease(runner_id, lease)?;
        let task = self.get(&task_id).await?;
        lease_matches(&task, lease)?;
        Ok(task)
    }

    /// What a lease's runner lacks: the base commit (and the previous patchset's) less what it
    /// already `have`s, as the repository makes it (`git bundle create`, whose stdout is the
    /// bundle; an empty bundle, which git refuses to make, means the runner has everything).
    pub async fn base_bundle(
        &self,
        runner_id: &str,
        lease: &LeaseRef,
        have: &[CommitId],
    ) -> Result<R::BaseBundle> {
        let task = self.check_lease(runner_id, lease).await?;
        let l = task
            .lease
            .as_ref()
            .ok_or_else(|| refused(lease, "the task has no lease"))?;
        self.repo
            .base_bundle(&task.id, &l.base_commit, l.previous_commit.as_ref(), have)
            .await
    }

    /// Records a runner's result: receives its commit (checked) under
    /// `refs/pipeline/tasks/<id>/<epoch>`, has the [`judge`] say what it means, and commits
    /// that: the dev and verify runs, the new patchset, the task's next state. A commit that is
    /// refused fails the attempt and the call (`InvalidArgument`, saying why); one the server
    /// cannot store for want of a resource is the server's trouble (`Internal`: the runner
    /// sends it again), never the task's.
    #[tracing::instrument(name = "result", skip_all, fields(task = tracing::field::Empty, lease = %result.lease.id))]
    pub async fn complete(
        &self,
        runner_id: &str,
        result: LeaseResult,
        bundle: Option<&Path>,
    ) -> Result<Task> {
        let task = self.check_lease(runner_id, &result.lease).await?;
        tracing::Span::current().record("task", tracing::field::display(&task.id));
        if let Some(live) = self.registry().lease(&result.lease.id) {
            // The result ends the lease's `run`.
            tracing::Span::current().follows_from(&live.span.0);
        }
        let lease = task
            .lease
            .clone()
            .ok_or_else(|| refused(&result.lease, "the task has no lease"))?;
        let received = match (result.result.outcome, &result.commit, bundle) {
            (Outcome::DevFailed, _, _) => Received::Nothing,
            (_, Some(commit), Some(path)) => {
                match self
                    .repo
                    .receive_bundle(path, &lease.base_commit, commit)
                    .await
                {
                    Ok(commit) => {
                        let patch = RefName::task_patch(&task.id, lease.epoch);
                        self.repo.update_ref(&patch, &commit).await?;
                        // With several servers (issue 28): the commit is kept on the remote
                        // before the result is acknowledged, where a new leader fetches it
                        // from; a push that fails is the infrastructure's (the runner sends
                        // the result again).
                        if let Some(remote) = self.patches_remote() {
                            self.repo.push_ref(remote, &patch, &commit).await?;
                        }
                        // The tree the runner really verified: a build of it can be skipped.
                        let verified_tree =
                            match (result.result.outcome, &result.result.verify_skipped) {
                                (Outcome::Verified, None) => {
                                    Some(self.repo.tree_of(&commit).await?)
                                }
                                _ => None,
                            };
                        Received::Stored {
                            commit,
                            verified_tree,
                        }
                    }
                    Err(Error::InvalidArgument(why)) => Received::Refused(why),
                    Err(other) => {
                        tracing::warn!(
                            task = %task.id,
                            runner = %lease.runner,
                            "could not store the commit (not the task's fault; the runner will \
                             send it again): {other}"
                        );
                        return Err(other);
                    }
                }
            }
            _ => Received::Refused(
                "commit refused: a verified or verify-failed result needs the commit and its \
                 bundle"
                    .to_owned(),
            ),
        };
        let judged = judge(
            &result.result,
            received,
            task.state.patchset + 1,
            &lease.runner,
            &self.verify_digest,
        );
        let judged = self
            .blame_verify_failure(judged, &task, &lease.base_commit, &result.result)
            .await?;
        let verify_run_id = self
            .registry()
            .lease(&result.lease.id)
            .and_then(|l| l.verify_run_id);
        let lease_ref = result.lease.clone();
        let updated = self
            .transition_from(
                task,
                &judged.event,
                |t| lease_matches(t, &lease_ref),
                |_, w| {
                    if let (Some(id), Some(run)) = (verify_run_id, &judged.verify) {
                        // The verify run began with its first log line: it ends now.
                        w.runs.end.push((
                            id,
                            RunEnd {
                                status: run.status,
                                cost_cents: 0.0,
                                error: run.error.clone(),
                                failure_kind: run.failure_kind,
                                builds: None,
                                usage: None,
                            },
                        ));
                    } else {
                        w.runs.record.extend(judged.verify.clone());
                    }
                    w.runs.close_rest = Some(judged.dev.clone());
                    if let Some(commit) = &judged.patch_commit {
                        w.next.patch_commit = Some(commit.clone());
                    }
                    w.next.verified_tree = judged.verified_tree.clone();
                },
            )
            .await?;
        match judged.refusal {
            Some(why) => Err(Error::InvalidArgument(why)),
            None => Ok(updated),
        }
    }

    /// A verification that failed on the runner is the task's own only if its base builds
    /// green under the same verification: on a base known red nobody is charged, and on a
    /// base not known green (the server has not built its tree for this task's scope) the task
    /// waits, Verified and uncharged, while the integrator builds that base alone. A failure
    /// under another verification than the server's is judged as it is.
    async fn blame_verify_failure(
        &self,
        mut judged: Judgement,
        task: &Task,
        base: &CommitId,
        result: &RunnerResult,
    ) -> Result<Judgement> {
        let Event::VerifyFailed { reason, cost_cents } = &judged.event else {
            return Ok(judged);
        };
        if result.verify_digest.as_deref() != Some(self.verify_digest.as_str()) {
            return Ok(judged);
        }
        let verifier = &self.settings.verifier;
        let scope = landing::scope(verifier, task.namespace.as_deref());
        let known_red = self.landing().red_base.as_ref().is_some_and(|r| {
            r.commit == *base && landing::scope(verifier, r.namespace.as_deref()) == scope
        });
        let event = if known_red {
            Event::VerifyFailedOnRedBase {
                base: base.to_string(),
                reason: reason.clone(),
                cost_cents: *cost_cents,
            }
        } else {
            let tree = self.repo.tree_of(base).await?;
            if self.landing().is_green(&tree, &scope) {
                return Ok(judged);
            }
            Event::VerifyFailedOnUncheckedBase {
                reason: reason.clone(),
                cost_cents: *cost_cents,
            }
        };
        // Not the task's failure, or not yet known to be.
        if let Some(verify) = judged.verify.as_mut() {
            verify.failure_kind = None;
        }
        judged.event = event;
        Ok(judged)
    }

    /// A runner gives a lease back unfinished; the task is offered again without counting.
    /// With `infrastructure`, the runner could not do the work (a missing program, a git or
    /// disk error): the run records that, and the reason.
    pub async fn release(
        &self,
        runner_id: &str,
        lease: &LeaseRef,
        reason: &str,
        infrastructure: bool,
    ) -> Result<Task> {
        let task = self.check_lease(runner_id, lease).await?;
        let reason = if reason.trim().is_empty() {
            "no reason given".to_owned()
        } else {
            reason.trim().to_owned()
        };
        if infrastructure {
            let runner = task
                .lease
                .as_ref()
                .map(|l| l.runner.clone())
                .unwrap_or_default();
            tracing::warn!(
                task = %task.id,
                runner,
                "infrastructure failure on the runner, lease given back uncharged: {}",
                reason.lines().next().unwrap_or_default()
            );
        }
        let event = Event::Released {
            reason,
            infrastructure,
        };
        self.transition_from(task, &event, |t| lease_matches(t, lease), |_, _| {})
            .await
    }

    /// Appends a runner's lines for a lease; returns the highest seq stored. The lines of the
    /// dev phase go to the lease's dev run, those of the verify phase to its verify run (started
    /// by the first of them), so each run's log is what its header says.
    pub async fn append_logs(
        &self,
        runner_id: &str,
        lease: &LeaseRef,
        lines: Vec<LogLine>,
    ) -> Result<u64> {
        if self.registry().is_build(&lease.id) {
            return self.build_lines(runner_id, lease, lines);
        }
        let (task, run_id, verify_run_id, runner) = {
            let mut registry = self.registry();
            // An ID the server does not know (it restarted, the runner is registering again)
            // is worth a retry; a lease that is someone else's is not.
            if registry.runner(runner_id).is_none() {
                return Err(unregistered(runner_id));
            }
            let live = registry
                .check(runner_id, lease, self.now())
                .map_err(|why| {
                    Error::FailedPrecondition(format!(
                        "lease {} (epoch {}) is no longer yours: {why}; drop the work",
                        lease.id, lease.epoch
                    ))
                })?;
            let found = (
                live.task.clone(),
                live.run_id,
                live.verify_run_id,
                live.runner.clone(),
            );
            if let Some(top) = lines.iter().map(|l| l.seq).max() {
                registry.note_seq(&lease.id, top);
            }
            found
        };
        let run_id = match run_id {
            Some(id) => id,
            None => self
                .store
                .running_runs(&task)
                .await?
                .into_iter()
                .find(|r| r.phase == Phase::Dev)
                .map(|r| r.id)
                .ok_or_else(|| {
                    Error::FailedPrecondition(format!("task {task} has no running run"))
                })?,
        };
        let (dev, verify): (Vec<LogLine>, Vec<LogLine>) = lines
            .into_iter()
            .map(|mut l| {
                l.text = cut_line(l.text);
                l
            })
            .partition(|l| l.phase != Phase::Verify);
        let mut acked = 0;
        if !dev.is_empty() {
            acked = self.logs.append(task.clone(), run_id, dev).await?;
        }
        if !verify.is_empty() {
            let verify_run = match verify_run_id {
                Some(id) => id,
                None => {
                    // The verify run belongs to the patchset the runner is about to send.
                    let patchset = self.get(&task).await?.state.patchset + 1;
                    let at = self.now();
                    let id = self
                        .store
                        .start_run(
                            &task,
                            &NewRun {
                                phase: Phase::Verify,
                                patchset,
                                runner: Some(runner),
                                train: None,
                            },
                            at,
                        )
                        .await?;
                    self.run_clocks().start(id, &task, Phase::Verify, at);
                    self.registry().set_verify_run(&lease.id, id);
                    id
                }
            };
            acked = acked.max(self.logs.append(task, verify_run, verify).await?);
        }
        Ok(acked)
    }

    /// Adds a line of the server's to the log of a lease's current run (why it ended: a
    /// cancel, a lapsed lease), numbered after every line the runner sent.
    pub(crate) fn note_on_run(&self, live: &LiveLease, text: &str) {
        let Some(run) = live.verify_run_id.or(live.run_id) else {
            return;
        };
        let line = LogLine {
            seq: live.last_seq + 1,
            at: self.now(),
            stream: LogStream::Server,
            phase: if live.verify_run_id.is_some() {
                Phase::Verify
            } else {
                Phase::Dev
            },
            text: cut_line(text.to_owned()),
        };
        self.logs.append_nowait(live.task.clone(), run, vec![line]);
    }
}

/// Fails unless `lease` is the task's current lease.
pub(super) fn lease_matches(task: &Task, lease: &LeaseRef) -> Result<()> {
    match &task.lease {
        Some(l) if l.id == lease.id && l.epoch == lease.epoch => Ok(()),
        Some(l) => Err(refused(
            lease,
            format!("task {} was re-leased (epoch {})", task.id, l.epoch),
        )),
        None => Err(refused(
            lease,
            format!("task {} is {} with no lease", task.id, task.state.status),
        )),
    }
}
