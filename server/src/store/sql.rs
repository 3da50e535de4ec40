//! What the two SQL backends share in shape: their [`Store`](super::Store) impl, each method
//! the function of the same name in the backend's module of its concern (`tasks`, `commit`,
//! `runs`, `events`, `trains`, `logs`, `meta`, `sessions`, `webhooks`), a write transaction
//! from the backend's `write()` where that function takes one; and their plan reads
//! ([`Reads`](super::plan::Reads) on a connection). The modules and their functions are the
//! backend's own (`sqlite/`, `postgres/`); only the way the traits reach them is here, once.

/// Implements `Store` for `$store`, a SQL backend, in the backend's `mod.rs`: there the names
/// the methods use (the concern modules, the domain types, `Store`) resolve to the backend's.
macro_rules! impl_store_by_concern {
    ($store:ty) => {
        impl Store for $store {
            async fn create_task(&self, new: NewTask, now: Millis) -> Result<Task> {
                tasks::create_task(self, new, now).await
            }

            async fn get_task(&self, id: &TaskId) -> Result<Option<Task>> {
                tasks::get_task(self, id).await
            }

            async fn list_tasks(
                &self,
                filter: &TaskFilter,
                after: Option<(u8, i64)>,
                limit: u32,
            ) -> Result<Vec<Task>> {
                tasks::list_tasks(self, filter, after, limit).await
            }

            async fn create_tasks(
                &self,
                new: Vec<NewTask>,
                now: Millis,
            ) -> Result<Vec<(Task, TaskEvent)>> {
                tasks::create_tasks(self, new, now).await
            }

            async fn set_paused(
                &self,
                id: &TaskId,
                paused: Option<&str>,
                message: &str,
                now: Millis,
            ) -> Result<u32> {
                tasks::set_paused(self, id, paused, message, now).await
            }

            async fn edit_task(
                &self,
                id: &TaskId,
                version: i64,
                edit: &TaskEdit,
                event: NewEvent,
                now: Millis,
            ) -> Result<Task> {
                tasks::edit_task(self, id, version, edit, event, now).await
            }

            async fn add_dependencies(
                &self,
                id: &TaskId,
                deps: &[TaskId],
                event: NewEvent,
                now: Millis,
            ) -> Result<Task> {
                tasks::add_dependencies(self, id, deps, event, now).await
            }

            async fn commit(&self, w: TaskWrite) -> Result<Committed> {
                commit::commit(self, w).await
            }

            async fn commit_all(&self, writes: Vec<TaskWrite>) -> Result<Vec<Result<Committed>>> {
                commit::commit_all(self, writes).await
            }

            async fn lease_candidates(
                &self,
                now: Millis,
                after: Option<(u8, i64)>,
                limit: u32,
            ) -> Result<Vec<Task>> {
                tasks::lease_candidates(self, now, after, limit).await
            }

            async fn verified(&self) -> Result<Vec<Task>> {
                tasks::verified(self).await
            }

            async fn finished_epics(&self) -> Result<Vec<TaskId>> {
                tasks::finished_epics(self).await
            }

            async fn unfinished(&self) -> Result<Vec<Task>> {
                tasks::unfinished(self).await
            }

            async fn raise_next_task_number(&self, at_least: u64) -> Result<()> {
                meta::raise_next_task_number(self, at_least).await
            }

            async fn is_fresh(&self) -> Result<bool> {
                meta::is_fresh(self).await
            }

            async fn next_backoff_end(&self, now: Millis) -> Result<Option<Millis>> {
                tasks::next_backoff_end(self, now).await
            }

            async fn runs(&self, id: &TaskId) -> Result<Vec<Run>> {
                runs::runs(self, id).await
            }

            async fn events(&self, id: &TaskId) -> Result<Vec<TaskEvent>> {
                events::events(self, id).await
            }

            async fn status_counts(&self) -> Result<StatusCounts> {
                tasks::status_counts(self).await
            }

            async fn tokens_of(&self, ids: &[TaskId]) -> Result<Vec<(TaskId, u64)>> {
                runs::tokens_of(self, ids).await
            }

            async fn statuses(&self, ids: &[TaskId]) -> Result<Vec<(TaskId, TaskStatus)>> {
                tasks::statuses(self, ids).await
            }

            async fn begin_integration(
                &self,
                entries: &[(Journal, CommitId)],
            ) -> Result<Option<TaskId>> {
                trains::begin_integration(self, entries).await
            }

            async fn start_train(
                &self,
                base_tip: &CommitId,
                tasks: &[TaskId],
                at: Millis,
            ) -> Result<i64> {
                trains::start_train(self, base_tip, tasks, at).await
            }

            async fn end_train(&self, id: i64, end: &TrainEnd, at: Millis) -> Result<()> {
                trains::end_train(self, id, end, at).await
            }

            async fn trains_since(&self, since: Millis) -> Result<Vec<TrainStat>> {
                trains::trains_since(self, since).await
            }

            async fn trains_in_flight(&self) -> Result<Vec<(i64, Vec<TaskId>)>> {
                trains::trains_in_flight(self).await
            }

            async fn abort_integration(&self, task: &TaskId) -> Result<()> {
                trains::abort_integration(self, task).await
            }

            async fn pending_integrations(&self) -> Result<Vec<Journal>> {
                trains::pending_integrations(self).await
            }

            async fn running_runs(&self, task: &TaskId) -> Result<Vec<Run>> {
                runs::running_runs(self, task).await
            }

            async fn usage_since(
                &self,
                since: Millis,
                bucket_ms: Millis,
            ) -> Result<Vec<UsageBucket>> {
                runs::usage_since(self, since, bucket_ms).await
            }

            async fn latest_session(&self, task: &TaskId) -> Result<Option<String>> {
                runs::latest_session(self, task).await
            }

            async fn start_run(&self, task: &TaskId, run: &NewRun, at: Millis) -> Result<i64> {
                runs::start_run(self, task, run, at).await
            }

            async fn end_run(&self, run: i64, end: &RunEnd, at: Millis) -> Result<()> {
                runs::end_run(self, run, end, at).await
            }

            async fn abandon_runs(&self, phase: Phase, error: &str, at: Millis) -> Result<u64> {
                runs::abandon_runs(self, phase, error, at).await
            }

            async fn run(&self, id: i64) -> Result<Option<Run>> {
                runs::run(self, id).await
            }

            async fn append_logs(&self, lines: &[(i64, LogLine)]) -> Result<()> {
                logs::append_logs(self, lines).await
            }

            async fn last_log_seq(&self, run: i64) -> Result<u64> {
                logs::last_log_seq(self, run).await
            }

            async fn read_logs(
                &self,
                run: i64,
                after_seq: u64,
                limit: u32,
            ) -> Result<Vec<LogLine>> {
                logs::read_logs(self, run, after_seq, limit).await
            }

            async fn trim_log(
                &self,
                run: i64,
                head_last_seq: u64,
                keep_tail_bytes: u64,
            ) -> Result<u64> {
                logs::trim_log(self, run, head_last_seq, keep_tail_bytes).await
            }

            async fn prune_logs(&self, before: Millis) -> Result<u64> {
                logs::prune_logs(self, before).await
            }

            async fn last_event_id(&self) -> Result<i64> {
                events::last_event_id(self).await
            }

            async fn events_after(&self, after_id: i64, limit: u32) -> Result<Vec<TaskEvent>> {
                events::events_after(self, after_id, limit).await
            }

            fn feed(&self) -> &Feed {
                &self.feed.feed
            }

            async fn record(&self, entry: &NewEntry) -> Result<i64> {
                events::record_alone(self, entry).await
            }

            async fn entries_after(&self, after: i64, limit: u32) -> Result<Vec<FeedEntry>> {
                events::entries_after(self, after, limit).await
            }

            async fn set_meta_recording(
                &self,
                key: &str,
                value: Option<&str>,
                entry: &NewEntry,
            ) -> Result<i64> {
                events::set_meta_recording(self, key, value, entry).await
            }

            fn write_failure(&self) -> Option<String> {
                self.write_failure.lock().ok().and_then(|f| f.clone())
            }

            async fn check_writable(&self) -> Result<()> {
                let tx = self.write().await?;
                tx.rollback().await;
                Ok(())
            }

            async fn get_meta(&self, key: &str) -> Result<Option<String>> {
                meta::get_meta(self, key).await
            }

            async fn list_meta(&self, prefix: &str) -> Result<Vec<(String, String)>> {
                meta::list_meta(self, prefix).await
            }

            async fn delete_meta(&self, key: &str) -> Result<()> {
                meta::delete_meta(self, key).await
            }

            async fn put_meta(&self, key: &str, value: &str) -> Result<()> {
                meta::put_meta(self, key, value).await
            }

            async fn sessions(&self) -> Result<Vec<SessionRecord>> {
                sessions::all(&self.pool).await
            }

            async fn put_session(&self, session: &SessionRecord) -> Result<()> {
                let mut tx = self.write().await?;
                let result = sessions::put(&mut tx, session).await;
                tx.finish(result).await
            }

            async fn end_sessions(&self, which: EndSessions<'_>) -> Result<u64> {
                let mut tx = self.write().await?;
                let result = sessions::end(&mut tx, which).await;
                tx.finish(result).await
            }

            async fn webhooks(&self) -> Result<Vec<WebhookCursor>> {
                webhooks::all(&self.pool).await
            }

            async fn open_webhook(
                &self,
                url: &str,
                head: i64,
                now: Millis,
            ) -> Result<WebhookCursor> {
                let mut tx = self.write().await?;
                let result = webhooks::open(&mut tx, url, head, now).await;
                tx.finish(result).await
            }

            async fn put_webhook(&self, cursor: &WebhookCursor) -> Result<bool> {
                let mut tx = self.write().await?;
                let result = webhooks::put(&mut tx, cursor).await;
                tx.finish(result).await
            }

            async fn forget_webhook(&self, url: &str) -> Result<bool> {
                let mut tx = self.write().await?;
                let result = webhooks::forget(&mut tx, url).await;
                tx.finish(result).await
            }
        }
    };
}

pub(crate) use impl_store_by_concern;

/// Defines `PlanReads`, what [`plan`](super::plan) reads answered with SQL on a `$conn`, in the
/// backend's `reads.rs`: there the functions each read calls (the backend's `graph`, `meta`
/// and `rows`) resolve to the backend's.
macro_rules! plan_reads_on {
    ($conn:ty) => {
        /// The plan's reads on a connection (inside the write transaction that then writes the plan).
        pub(super) struct PlanReads<'a>(pub(super) &'a mut $conn);

        impl Reads for PlanReads<'_> {
            async fn statuses(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, TaskStatus>> {
                let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
                let found =
                    pairs_of(self.0, "SELECT id, status FROM tasks WHERE id IN (", &ids).await?;
                found
                    .into_iter()
                    .map(|(id, status)| Ok((stored_id(&id)?, stored_status(&status)?)))
                    .collect()
            }

            async fn paused(&mut self, ids: &[&TaskId]) -> Result<HashMap<TaskId, String>> {
                let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
                let found = pairs_of(
                    self.0,
                    "SELECT id, paused FROM tasks WHERE paused IS NOT NULL AND id IN (",
                    &ids,
                )
                .await?;
                found
                    .into_iter()
                    .map(|(id, why)| Ok((stored_id(&id)?, why)))
                    .collect()
            }

            async fn next_number(&mut self) -> Result<u64> {
                next_number(self.0).await
            }

            async fn waited_on(&mut self, ids: &[&TaskId]) -> Result<Vec<TaskId>> {
                let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
                waited_on(self.0, &ids).await
            }

            async fn is_ancestor(&mut self, ancestor: &TaskId, task: &TaskId) -> Result<bool> {
                is_ancestor_task(self.0, ancestor, task).await
            }
        }
    };
}

pub(crate) use plan_reads_on;
