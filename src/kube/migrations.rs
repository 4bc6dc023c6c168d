//! VolumeMigration: the controller pre-warms the target node of each migration and reports
//! progress in the object's status and as Events on its claim.
//!
//! Each VolumeMigration not yet Completed or Failed gets a worker task that goes:
//!
//! 1. **Pending** until the claim is bound (the message says so);
//! 2. **Copying**: [`Migrator::prewarm`] ships the volume to the target, round after round,
//!    with bytes and percent in the status (written at most once a second);
//! 3. **ReadyToCutOver**: the target holds a recent copy; moving the pod there (the next
//!    attach on the target) ships only the changes since;
//! 4. **Completed** once [`Migrator::primary_node`] is the target (checked at every pass, so
//!    a migration whose volume already lives on the target completes at once).
//!
//! A migration left ReadyToCutOver is not copied again: the longer it waits, the more of
//! what changed since the cut-over has to ship.
//!
//! A claim or node that does not exist (NOT_FOUND, INVALID_ARGUMENT, …) makes it **Failed**;
//! anything else (an unreachable node or API server, a move in progress) leaves the phase
//! as it is, says why in the message and retries with back-off. The status is where a
//! worker resumes after a controller restart or a change of leader: a migration found
//! Copying is copied again (node-side transfers resume where they stopped), one found
//! ReadyToCutOver only waits for the cut-over.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::ResourceExt;
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tonic::Code;

use super::{
    ClusterApi, MigrationEvent,
    crd::{MigrationPhase, VolumeMigration, VolumeMigrationSpec, VolumeMigrationStatus},
    tasks::{Backoff, sleep_or_stop},
};
use crate::error::{Error, Result};

/// What the migrations loop needs from the cluster controller.
#[async_trait]
pub trait Migrator: Send + Sync {
    /// Ships volume `volume_id` to node `to` while it stays in use where it is, until `to`
    /// is close enough behind to cut over; `progress(bytes_done, bytes_total)` reports the
    /// round in flight (a new round starts again from 0).
    async fn prewarm(
        &self,
        volume_id: &str,
        to: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()>;

    /// The node holding the writable copy of the volume, if any.
    async fn primary_node(&self, volume_id: &str) -> Result<Option<String>>;
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Between passes of a worker waiting for a claim to be bound or for the cut-over.
    poll: Duration,
    /// Least time between two progress writes of one migration's status.
    status_every: Duration,
    /// Least time between two MigrationProgress Events of one migration.
    progress_event_every: Duration,
    retry_min: Duration,
    retry_max: Duration,
}

const TIMING: Timing = Timing {
    poll: Duration::from_secs(5),
    status_every: Duration::from_secs(1),
    progress_event_every: Duration::from_secs(60),
    retry_min: Duration::from_secs(1),
    retry_max: Duration::from_secs(60),
};

/// Watches the VolumeMigrations of `namespace` (None: every namespace) and drives each one
/// (see the module documentation) until `shutdown`, which stops every worker. Run it in the
/// leader only: spawn it when [`super::leader_election`] reports leadership and shut it
/// down when that ends. A watch that drops or fails is followed by a fresh list (after a
/// back-off when it failed), which also stops the workers of migrations deleted meanwhile.
pub async fn migrations(
    api: Arc<dyn ClusterApi>,
    migrator: Arc<dyn Migrator>,
    namespace: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ctx = Arc::new(Ctx {
        api,
        migrator,
        timing: TIMING,
    });
    let mut workers = Workers::default();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let started = Instant::now();
        let listed = tokio::select! {
            r = ctx.api.watch_migrations(namespace.as_deref()) => r,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let failed = match listed {
            Ok(mut events) => loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    _ = shutdown.wait_for(|stop| *stop) => {
                        workers.stop_all();
                        return;
                    }
                };
                match next {
                    None => break false,
                    Some(Ok(event)) => workers.handle(event, &ctx),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "VolumeMigration watch failed");
                        break true;
                    }
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot list VolumeMigrations");
                true
            }
        };
        // A watch the server ended is simply listed again, but never in a tight loop.
        let wait = if failed {
            backoff.next()
        } else {
            backoff.reset();
            Duration::from_secs(1).saturating_sub(started.elapsed())
        };
        if sleep_or_stop(wait, &mut shutdown).await {
            break;
        }
    }
    workers.stop_all();
}

struct Ctx {
    api: Arc<dyn ClusterApi>,
    migrator: Arc<dyn Migrator>,
    timing: Timing,
}

/// One worker per VolumeMigration (namespace, name). A worker ends only once it has written
/// Completed or Failed (or its object is gone), so a finished worker of the same uid means
/// "done": it is not started again for an event that still shows an older status.
#[derive(Default)]
struct Workers {
    running: HashMap<(String, String), Worker>,
}

struct Worker {
    uid: String,
    task: JoinHandle<()>,
}

fn key(vm: &VolumeMigration) -> (String, String) {
    (vm.namespace().unwrap_or_default(), vm.name_any())
}

impl Workers {
    fn handle(&mut self, event: MigrationEvent, ctx: &Arc<Ctx>) {
        match event {
            MigrationEvent::Listed(all) => {
                let present: std::collections::HashSet<_> = all.iter().map(key).collect();
                self.running.retain(|k, w| {
                    let keep = present.contains(k);
                    if !keep {
                        w.task.abort();
                    }
                    keep
                });
                for vm in all {
                    self.apply(vm, ctx);
                }
            }
            MigrationEvent::Applied(vm) => self.apply(vm, ctx),
            MigrationEvent::Deleted(vm) => {
                if let Some(w) = self.running.remove(&key(&vm)) {
                    w.task.abort();
                }
            }
        }
    }

    fn apply(&mut self, vm: VolumeMigration, ctx: &Arc<Ctx>) {
        let k = key(&vm);
        let uid = vm.uid().unwrap_or_default();
        if vm.metadata.deletion_timestamp.is_some() {
            if let Some(w) = self.running.remove(&k) {
                w.task.abort();
            }
            return;
        }
        if let Some(w) = self.running.get(&k) {
            // Running, or done: a worker's own writes come back here, Completed or Failed
            // included, while it records its last event.
            if w.uid == uid {
                return;
            }
            // Deleted and created again under the same name.
            w.task.abort();
            self.running.remove(&k);
        }
        if vm.status.as_ref().is_some_and(|s| s.phase.is_terminal()) {
            return;
        }
        let task = tokio::spawn(drive(ctx.clone(), vm));
        self.running.insert(k, Worker { uid, task });
    }

    fn stop_all(&mut self) {
        for (_, w) in self.running.drain() {
            w.task.abort();
        }
    }
}

/// Why a worker pass stopped early.
enum Halt {
    /// The VolumeMigration is gone (its status write found nothing).
    Gone,
    /// Try again after a back-off.
    Retry(Error),
}

enum Pass {
    /// Completed or Failed is written: the worker ends.
    Done,
    /// Look again after the poll interval.
    Wait,
}

/// An error no retry can fix: the claim, the volume or the node does not exist, or the
/// request is malformed. Everything else (UNAVAILABLE, ABORTED for a move in progress,
/// FAILED_PRECONDITION for a state that may change, PERMISSION_DENIED until RBAC is fixed)
/// is retried.
fn permanent(e: &Error) -> bool {
    matches!(
        e.code(),
        Code::NotFound
            | Code::InvalidArgument
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::Unimplemented
    )
}

/// One VolumeMigration being driven.
struct Migration {
    ctx: Arc<Ctx>,
    namespace: String,
    name: String,
    spec: VolumeMigrationSpec,
    generation: Option<i64>,
    status: VolumeMigrationStatus,
    /// Reason of the conditions when Failed.
    failure: Option<&'static str>,
}

async fn drive(ctx: Arc<Ctx>, vm: VolumeMigration) {
    let timing = ctx.timing;
    let mut m = Migration {
        namespace: vm.namespace().unwrap_or_default(),
        name: vm.name_any(),
        generation: vm.metadata.generation,
        spec: vm.spec,
        status: vm.status.unwrap_or_default(),
        failure: None,
        ctx,
    };
    let mut backoff = Backoff::new(timing.retry_min, timing.retry_max);
    loop {
        let wait = match m.pass().await {
            Ok(Pass::Done) | Err(Halt::Gone) => return,
            Ok(Pass::Wait) => {
                backoff.reset();
                timing.poll
            }
            Err(Halt::Retry(e)) => {
                tracing::warn!(migration = %m.name, namespace = %m.namespace, error = %e, "migration step failed; retrying");
                let message = format!("retrying: {e}");
                if m.status.message != message {
                    m.status.message = message;
                    if let Err(Halt::Gone) = m.write().await {
                        return;
                    }
                }
                backoff.next()
            }
        };
        tokio::time::sleep(wait).await;
    }
}

impl Migration {
    async fn pass(&mut self) -> Result<Pass, Halt> {
        let target = self.spec.target_node.clone();
        let claim = format!("{}/{}", self.namespace, self.spec.pvc);
        let volume = match self
            .ctx
            .api
            .volume_handle(&self.namespace, &self.spec.pvc)
            .await
        {
            Ok(Some(v)) => v,
            Ok(None) => {
                let message = format!("waiting for claim {claim} to be bound");
                if self.status.phase != MigrationPhase::Pending || self.status.message != message {
                    self.status.phase = MigrationPhase::Pending;
                    self.status.message = message;
                    self.write().await?;
                }
                return Ok(Pass::Wait);
            }
            Err(e) if permanent(&e) => {
                let reason = if e.code() == Code::NotFound {
                    "ClaimNotFound"
                } else {
                    "ClaimNotUsable"
                };
                return self.fail(reason, &e).await;
            }
            Err(e) => return Err(Halt::Retry(e)),
        };
        match self.ctx.migrator.primary_node(&volume).await {
            Ok(Some(node)) if node == target => return self.complete(&volume).await,
            Ok(_) => {}
            Err(e) if permanent(&e) => return self.fail(failure_reason(&e), &e).await,
            Err(e) => return Err(Halt::Retry(e)),
        }
        if self.status.phase == MigrationPhase::ReadyToCutOver {
            return Ok(Pass::Wait);
        }
        let starting = self.status.phase == MigrationPhase::Pending;
        self.status.phase = MigrationPhase::Copying;
        self.status.round += 1;
        self.status.bytes_done = 0;
        self.status.bytes_total = 0;
        self.status.percent = 0;
        self.status.message = format!("copying volume {volume} to node {target}");
        self.write().await?;
        if starting {
            let message = format!("copying volume {volume} to node {target}");
            self.event("MigrationStarted", message, false).await;
        }
        match self.prewarm(&volume, &target).await {
            Ok(()) => {}
            Err(e) if permanent(&e) => return self.fail(failure_reason(&e), &e).await,
            Err(e) => return Err(Halt::Retry(e)),
        }
        self.status.phase = MigrationPhase::ReadyToCutOver;
        self.status.bytes_done = self.status.bytes_total;
        self.status.percent = 100;
        self.status.message = format!(
            "node {target} holds a recent copy of volume {volume}: move the pod there to cut over"
        );
        self.write().await?;
        self.event(
            "MigrationReady",
            format!(
                "node {target} holds a recent copy of volume {volume}; moving the pod there \
                 now ships only what changed since"
            ),
            false,
        )
        .await;
        Ok(Pass::Wait)
    }

    /// Runs the migrator's pre-warm, writing its progress at most every `status_every`.
    async fn prewarm(&mut self, volume: &str, target: &str) -> Result<()> {
        let timing = self.ctx.timing;
        let migrator = self.ctx.migrator.clone();
        // (bytes done, bytes total, rounds begun since this call started)
        let progress = Mutex::new((0u64, 0u64, 0u32));
        let report = |done: u64, total: u64| {
            let mut p = progress.lock().expect("progress lock poisoned");
            // A new round starts again from zero.
            if done < p.0 {
                p.2 += 1;
            }
            p.0 = done;
            p.1 = total;
        };
        let copy = migrator.prewarm(volume, target, &report);
        tokio::pin!(copy);
        let first_round = self.status.round;
        let mut last_event = Instant::now();
        // The first tick one period out: the pass has just written the status. A second
        // clock (time of the last write) beside the ticks would skip every other write,
        // since each write lands a little after its tick.
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + timing.status_every,
            timing.status_every,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = &mut copy => {
                    let (done, total, rounds) = *progress.lock().expect("progress lock poisoned");
                    self.set_progress(done, total, first_round + rounds);
                    return r;
                }
                _ = tick.tick() => {
                    let (done, total, rounds) = *progress.lock().expect("progress lock poisoned");
                    let round = first_round + rounds;
                    let s = &self.status;
                    if (s.bytes_done, s.bytes_total, s.round) == (done, total, round) {
                        continue;
                    }
                    self.set_progress(done, total, round);
                    // Progress is informative: a failed write is retried at the next tick.
                    if let Err(Halt::Retry(e)) = self.write().await {
                        tracing::debug!(migration = %self.name, error = %e, "progress write failed");
                    }
                    if last_event.elapsed() >= timing.progress_event_every {
                        last_event = Instant::now();
                        let s = &self.status;
                        let message = format!(
                            "round {}: {} of {} MiB copied to node {target} ({}%)",
                            s.round, s.bytes_done >> 20, s.bytes_total >> 20, s.percent
                        );
                        self.event("MigrationProgress", message, false).await;
                    }
                }
            }
        }
    }

    fn set_progress(&mut self, done: u64, total: u64, round: u32) {
        self.status.bytes_done = done;
        self.status.bytes_total = total;
        self.status.round = round;
        self.status.percent = percent(done, total);
    }

    async fn complete(&mut self, volume: &str) -> Result<Pass, Halt> {
        let target = self.spec.target_node.clone();
        self.status.phase = MigrationPhase::Completed;
        self.status.message = format!("volume {volume} lives on node {target}");
        self.write().await?;
        let message = format!("volume {volume} now lives on node {target}");
        self.event("MigrationCompleted", message, false).await;
        Ok(Pass::Done)
    }

    async fn fail(&mut self, reason: &'static str, e: &Error) -> Result<Pass, Halt> {
        tracing::warn!(migration = %self.name, namespace = %self.namespace, reason, error = %e, "migration failed");
        self.status.phase = MigrationPhase::Failed;
        self.status.message = e.to_string();
        self.failure = Some(reason);
        self.write().await?;
        self.event("MigrationFailed", format!("{reason}: {e}"), true)
            .await;
        Ok(Pass::Done)
    }

    /// Writes the whole status, conditions derived from the phase.
    async fn write(&mut self) -> Result<(), Halt> {
        set_conditions(
            &mut self.status,
            self.generation,
            self.failure,
            Timestamp::now(),
        );
        match self
            .ctx
            .api
            .set_migration_status(&self.namespace, &self.name, &self.status)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Code::NotFound => Err(Halt::Gone),
            Err(e) => Err(Halt::Retry(e)),
        }
    }

    /// Events are for people: one that cannot be recorded is logged, never an error.
    async fn event(&self, reason: &str, message: String, warning: bool) {
        if let Err(e) = self
            .ctx
            .api
            .pvc_event(&self.namespace, &self.spec.pvc, reason, &message, warning)
            .await
        {
            tracing::warn!(migration = %self.name, reason, error = %e, "cannot record event");
        }
    }
}

fn failure_reason(e: &Error) -> &'static str {
    match e {
        Error::NodeNotFound(_) => "NodeNotFound",
        Error::VolumeNotFound(_) => "VolumeNotFound",
        _ => "CopyFailed",
    }
}

fn percent(done: u64, total: u64) -> u32 {
    match total {
        0 => 0,
        _ => (u128::from(done.min(total)) * 100 / u128::from(total)) as u32,
    }
}

/// `Ready` (the target holds a copy to cut over to) and `Complete` (the volume lives on the
/// target) from the phase; a condition keeps its lastTransitionTime while its status stays.
fn set_conditions(
    status: &mut VolumeMigrationStatus,
    generation: Option<i64>,
    failure: Option<&str>,
    now: Timestamp,
) {
    let phase = status.phase;
    let other = match (phase, failure) {
        (MigrationPhase::Failed, Some(reason)) => reason,
        _ => phase.as_str(),
    };
    let ready = match phase {
        MigrationPhase::ReadyToCutOver | MigrationPhase::Completed => ("True", "Prewarmed"),
        _ => ("False", other),
    };
    let complete = match phase {
        MigrationPhase::Completed => ("True", "MovedToTarget"),
        _ => ("False", other),
    };
    let mut conditions = Vec::with_capacity(2);
    for (type_, (state, reason)) in [("Ready", ready), ("Complete", complete)] {
        let since = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == state)
            .map_or(Time(now), |c| c.last_transition_time.clone());
        conditions.push(Condition {
            type_: type_.to_string(),
            status: state.to_string(),
            reason: reason.to_string(),
            message: status.message.clone(),
            last_transition_time: since,
            observed_generation: generation,
        });
    }
    status.conditions = conditions;
}

#[cfg(test)]
mod driving;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_of_a_round() {
        for (done, total, want) in [
            (0, 0, 0),
            (0, 10, 0),
            (5, 10, 50),
            (10, 10, 100),
            (11, 10, 100),
            (u64::MAX / 2, u64::MAX, 49),
        ] {
            assert_eq!(percent(done, total), want, "{done}/{total}");
        }
    }

    #[test]
    fn errors_that_fail_a_migration() {
        for (e, want) in [
            (Error::NodeNotFound("n".into()), true),
            (Error::VolumeNotFound("v".into()), true),
            (Error::invalid("pvc", "not a berth volume"), true),
            (
                Error::Unreachable {
                    node: "n".into(),
                    reason: "down".into(),
                },
                false,
            ),
            (Error::Aborted("v".into()), false),
            (Error::FailedPrecondition("fenced".into()), false),
            (
                Error::Peer {
                    node: "kubernetes api".into(),
                    status: tonic::Status::permission_denied("rbac"),
                },
                false,
            ),
            (
                Error::Peer {
                    node: "kubernetes api".into(),
                    status: tonic::Status::not_found("pvc"),
                },
                true,
            ),
        ] {
            assert_eq!(permanent(&e), want, "{e}");
        }
    }

    #[test]
    fn conditions_follow_the_phase_and_keep_their_transition_time() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut s = VolumeMigrationStatus {
            phase: MigrationPhase::Copying,
            message: "copying".into(),
            ..Default::default()
        };
        set_conditions(&mut s, Some(1), None, t0);
        let view = |s: &VolumeMigrationStatus| -> Vec<(String, String, String, Timestamp)> {
            s.conditions
                .iter()
                .map(|c| {
                    (
                        c.type_.clone(),
                        c.status.clone(),
                        c.reason.clone(),
                        c.last_transition_time.0,
                    )
                })
                .collect()
        };
        let row = |t: &str, s: &str, r: &str, at| (t.into(), s.into(), r.into(), at);
        assert_eq!(
            view(&s),
            [
                row("Ready", "False", "Copying", t0),
                row("Complete", "False", "Copying", t0)
            ]
        );
        s.phase = MigrationPhase::ReadyToCutOver;
        set_conditions(&mut s, Some(1), None, t1);
        assert_eq!(
            view(&s),
            [
                row("Ready", "True", "Prewarmed", t1),
                row("Complete", "False", "ReadyToCutOver", t0)
            ]
        );
        s.phase = MigrationPhase::Failed;
        set_conditions(&mut s, Some(2), Some("NodeNotFound"), t1);
        assert_eq!(
            view(&s),
            [
                row("Ready", "False", "NodeNotFound", t1),
                row("Complete", "False", "NodeNotFound", t0)
            ]
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(2))
        );
    }
}
