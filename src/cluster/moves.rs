//! Moving data between nodes: hand-offs (a volume's primary moves), replication rounds
//! (replicas catch up) and pre-warming (a future target catches up while the volume stays
//! in use). Every step is idempotent and its state lives on the nodes, so any step may be
//! retried by any controller after any crash (docs/moving.md walks through each case).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{FutureExt, future::Shared};
use tonic::Code;

use super::{Cluster, Copy, Placement, common_base, peer};
use crate::{
    error::{Error, Result},
    placement::{Handoff, ReplicaPlacement},
    proto::agent::v1::{self as pb},
    storage::VolumeId,
    util::failpoint,
};

/// A report of bytes moved, for progress displays.
pub type OnProgress<'a> = &'a (dyn Fn(&pb::FetchProgress) + Send + Sync);

fn ignore(_: &pb::FetchProgress) {}

/// One shipping snapshot on its way from one node to another.
pub struct Shipment<'a> {
    pub vol: &'a VolumeId,
    pub from: &'a str,
    pub to: &'a str,
    pub snapshot: &'a str,
    /// The newest snapshot both hold; none ships everything.
    pub base: Option<String>,
    /// The primary epoch the receiving copy follows.
    pub epoch: u64,
    pub template: Option<pb::VolumeTemplate>,
}

impl Cluster {
    /// Asks the receiving node to pull the snapshot, waiting for the end.
    pub async fn ship(
        &self,
        s: Shipment<'_>,
        on_progress: OnProgress<'_>,
    ) -> Result<pb::FetchProgress> {
        let Shipment {
            vol,
            from,
            to,
            snapshot,
            base,
            epoch,
            template,
        } = s;
        let source = self.member(from)?;
        let mut stream = self
            .agent(to)?
            .fetch(pb::FetchRequest {
                volume_id: vol.to_string(),
                snapshot_id: snapshot.to_string(),
                kind: pb::SnapshotKind::Shipping as i32,
                base_snapshot_id: base.clone().unwrap_or_default(),
                source_node_id: from.to_string(),
                source_address: source.address.clone(),
                epoch,
                template,
                grant: Some(self.grant(pb::GrantBody {
                    snapshot_id: snapshot.to_string(),
                    kind: pb::SnapshotKind::Shipping as i32,
                    base_snapshot_id: base.unwrap_or_default(),
                    source_node_id: from.to_string(),
                    receiver_node_id: to.to_string(),
                    expires_unix_seconds: 0,
                })?),
            })
            .await
            .map_err(|s| peer(to, s))?
            .into_inner();
        let mut last = pb::FetchProgress::default();
        while let Some(p) = stream.message().await.map_err(|s| peer(to, s))? {
            on_progress(&p);
            let done = p.done;
            last = p;
            if done {
                return Ok(last);
            }
        }
        Err(Error::Unreachable {
            node: to.to_string(),
            reason: format!(
                "fetch of {snapshot} ended without completing ({} bytes done)",
                last.bytes_done
            ),
        })
    }

    /// Moves `vol`'s primary to `to`: fence the old primary (it stops accepting publishes
    /// and cuts a final snapshot), ship what `to` lacks, promote `to` at a higher epoch, then
    /// settle the old copy into a replica or drop it. Re-entrant at every step.
    pub async fn hand_off(
        &self,
        vol: &VolumeId,
        to: &str,
        on_progress: OnProgress<'_>,
    ) -> Result<()> {
        self.member(to)?;
        let p = self.locate(vol).await?;
        if p.is_empty() {
            return Err(Error::VolumeNotFound(vol.to_string()));
        }
        // The new epoch must be above every copy's, and a silent node may hold the primary.
        p.require_all(vol)?;
        if let Some(primary) = &p.primary
            && primary.node == to
        {
            return self.settle_fenced(vol, &p, primary).await;
        }
        // An earlier hand-off that promoted its target but never settled its source (the
        // controller died in between) is tidied first, wherever this one goes: nothing else
        // would settle it once the volume has moved on.
        let p = match &p.primary {
            Some(primary)
                if p.fenced
                    .iter()
                    .any(|f| f.info.fence_epoch <= primary.info.epoch) =>
            {
                self.settle_fenced(vol, &p, primary).await?;
                self.locate(vol).await?
            }
            _ => p,
        };
        let pvc = p.pvc();
        let started = std::time::Instant::now();
        let from = p.holder().map(|c| c.node.clone()).unwrap_or_default();
        self.pvc_event(
            pvc.clone(),
            "VolumeMoveStarted",
            format!("berth is moving volume {vol} from node {from} to node {to}, where it is being attached"),
            false,
        );
        // A step that failed on a node is the move's failure, not the CO's: its code (say
        // NOT_FOUND for a pruned snapshot) must not reach ControllerPublishVolume, whose
        // table gives NOT_FOUND one meaning only. The move resumes on the next publish.
        // Except a target without room (RESOURCE_EXHAUSTED from its Fetch or Promote): the
        // table's RESOURCE_EXHAUSTED is a node that can take no more volumes, to be retried
        // with backoff once something leaves it, which is this case exactly; UNAVAILABLE
        // would promise that a retry resumes the move (docs/moving.md, "A hand-off").
        let result = self
            .take_over(vol, to, p, on_progress)
            .await
            .map_err(|e| match e {
                Error::Peer { node, status }
                    if !matches!(
                        status.code(),
                        tonic::Code::Aborted | tonic::Code::ResourceExhausted
                    ) =>
                {
                    Error::MoveInterrupted {
                        volume: vol.to_string(),
                        node,
                        reason: status.message().to_string(),
                    }
                }
                e => e,
            });
        self.metrics.move_ended(
            match &result {
                Ok(_) => "succeeded",
                Err(e) if e.code() == tonic::Code::Aborted => "aborted",
                Err(_) => "failed",
            },
            *result.as_ref().unwrap_or(&0),
        );
        match &result {
            Ok(bytes) => self.pvc_event(
                pvc,
                "VolumeMoved",
                format!(
                    "berth moved volume {vol} from node {from} to node {to}: {} MiB shipped in {:.1}s",
                    bytes >> 20,
                    started.elapsed().as_secs_f64()
                ),
                false,
            ),
            // Another operation on the volume: the CO retries, nothing to report yet.
            Err(e) if e.code() == tonic::Code::Aborted => {}
            Err(e) => self.pvc_event(
                pvc,
                "VolumeMoveFailed",
                format!("berth could not move volume {vol} from node {from} to node {to} (it retries with the next publish): {e}"),
                true,
            ),
        }
        result.map(|_| ())
    }

    /// The hand-off proper, from a placement where `to` is not the primary. Returns the
    /// bytes shipped.
    async fn take_over(
        &self,
        vol: &VolumeId,
        to: &str,
        mut p: Placement,
        on_progress: OnProgress<'_>,
    ) -> Result<u64> {
        // The copy to take over from: a fence towards `to` left by an earlier attempt, or
        // the primary.
        let source = match p.fenced.iter().find(|c| c.info.fenced_to == to) {
            Some(f) => f.clone(),
            None => {
                // A hand-off to another node that never finished is cancelled first.
                if p.primary.is_none() && !p.fenced.is_empty() {
                    self.cancel_hand_off(vol, &p).await?;
                    p = self.locate(vol).await?;
                }
                let primary = p.primary.clone().ok_or_else(|| Error::Unreachable {
                    node: p.unreachable.join(", "),
                    reason: format!("no primary of volume {vol} answered"),
                })?;
                if primary.node == to {
                    // The cancelled hand-off was away from `to`: the volume is home.
                    tracing::info!(volume.id = %vol, node = to, "hand-off cancelled; the volume stays");
                    return Ok(0);
                }
                if let Some(n) = primary.info.published_node_ids.first() {
                    // Spec, ControllerPublishVolume: a volume published to another node
                    // with a single-node capability is FAILED_PRECONDITION.
                    return Err(Error::FailedPrecondition(format!(
                        "volume {vol} is still published to node {n}; unpublish it there first"
                    )));
                }
                primary
            }
        };
        let epoch = if source.role() == pb::Role::Fenced {
            source.info.fence_epoch
        } else {
            p.max_epoch() + 1
        };
        let target = p.copy_on(to).cloned();
        let base = target
            .as_ref()
            .and_then(|t| common_base(&source.info, &t.info));
        // The ownership change is decided here, as one compare-and-swap on the record read
        // at the start: of two controllers moving the volume (two replicas, a stale
        // leader), exactly one records its hand-off; the other's write fails and its
        // publish is ABORTED, before it touched any node.
        self.record_handoff(vol, &p, to, epoch).await?;
        failpoint::hit("handoff:after-record");
        let fenced = self
            .agent(&source.node)?
            .fence(pb::FenceRequest {
                volume_id: vol.to_string(),
                to_node_id: to.to_string(),
                epoch,
                keep: base.iter().cloned().collect(),
            })
            .await;
        let fenced = match fenced {
            Ok(f) => f.into_inner(),
            // The source refused to fence (still published, after another controller's
            // publish there; or fenced towards another target): it wrote no fence, so the
            // hand-off just recorded names one that never happened, and nothing would
            // ever clear it. It goes, if the record still holds it.
            Err(status)
                if status.code() == Code::FailedPrecondition
                    && source.role() == pb::Role::Primary =>
            {
                let (to2, epoch2) = (to.to_string(), epoch);
                self.update_record(vol, |r| {
                    if r.handoff
                        .as_ref()
                        .is_some_and(|h| h.to == to2 && h.epoch == epoch2)
                    {
                        r.handoff = None;
                    }
                })
                .await?;
                return Err(peer(&source.node, status));
            }
            Err(status) => return Err(peer(&source.node, status)),
        };
        let snap = fenced.snapshot.unwrap_or_default().snapshot_id;
        failpoint::hit("handoff:after-fence");
        tracing::info!(volume.id = %vol, from = %source.node, to, epoch, base = ?base, "hand-off: shipping the final snapshot");
        let shipped = self
            .ship(
                Shipment {
                    vol,
                    from: &source.node,
                    to,
                    snapshot: &snap,
                    base,
                    epoch,
                    template: fenced.template,
                },
                on_progress,
            )
            .await;
        let shipped = match shipped {
            Ok(s) => s,
            // The target refuses this epoch: a cancel of this hand-off raised its floor
            // (another controller's, or one killed before its unfence), so the fence can
            // never complete, and resuming it, as every publish to `to` would, is refused
            // forever. The cancel is finished here; the next publish hands off above it.
            Err(Error::Peer { node, status })
                if node == to && status.code() == Code::FailedPrecondition =>
            {
                tracing::warn!(volume.id = %vol, to, epoch, reason = status.message(), "hand-off refused by its target; cancelling it");
                // Only this hand-off's fence: a newer one (another controller's, above the
                // floor) is not this refusal's to cancel.
                let p = self.locate(vol).await?;
                let ours = |f: &Copy| f.info.fenced_to == to && f.info.fence_epoch == epoch;
                if p.primary.is_none() && p.fenced.iter().any(ours) {
                    self.cancel_hand_off(vol, &p).await?;
                }
                return Err(Error::Peer { node, status });
            }
            Err(e) => return Err(e),
        };
        failpoint::hit("handoff:after-ship");
        self.agent(to)?
            .promote(pb::PromoteRequest {
                volume_id: vol.to_string(),
                epoch,
                snapshot_id: snap,
            })
            .await
            .map_err(|s| peer(to, s))?;
        tracing::info!(volume.id = %vol, to, epoch, "hand-off: new primary promoted");
        failpoint::hit("handoff:after-promote");
        self.record_promotion(vol, to, epoch, &source.node).await?;
        failpoint::hit("handoff:after-record-primary");
        self.settle(vol, &source, to, epoch).await?;
        Ok(shipped.bytes_done)
    }

    /// Records the hand-off of `vol` to `to` at `epoch` in the record `p` was read from,
    /// unless it is recorded already (a resumed hand-off).
    async fn record_handoff(
        &self,
        vol: &VolumeId,
        p: &Placement,
        to: &str,
        epoch: u64,
    ) -> Result<()> {
        let Some(cur) = &p.record else {
            return Err(Error::VolumeNotFound(vol.to_string()));
        };
        let want = Handoff {
            to: to.to_string(),
            epoch,
        };
        if cur.record.handoff.as_ref() == Some(&want) {
            return Ok(());
        }
        let mut next = cur.record.clone();
        next.handoff = Some(want);
        match self.store.replace(&next, &cur.version).await {
            Ok(_) => Ok(()),
            // Conflict, not Aborted: Aborted's message is "an operation on {0} is already
            // in progress", which this sentence is not.
            Err(Error::Conflict { what, reason }) => Err(Error::Conflict {
                what,
                reason: format!(
                    "{reason}, while this controller decided to move the volume to {to}; retry"
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// Records that `to` is the primary at `epoch`, with the old primary `from` a replica
    /// until it is settled. Written after the promotion: the nodes' epochs are what fences
    /// (the old copy refuses every publish from its fence on), and the record follows the
    /// promotion that landed. A crash before this write is caught up by the next look-up
    /// (`Cluster::reconcile`).
    async fn record_promotion(
        &self,
        vol: &VolumeId,
        to: &str,
        epoch: u64,
        from: &str,
    ) -> Result<()> {
        self.update_record(vol, |r| {
            if r.epoch <= epoch {
                r.primary = to.to_string();
                r.epoch = epoch;
                r.handoff = None;
                r.replicas.retain(|x| x.node != to);
                if !r.replicas.iter().any(|x| x.node == from) {
                    r.replicas.push(ReplicaPlacement {
                        node: from.to_string(),
                        ..Default::default()
                    });
                }
            }
        })
        .await
        .map(|_| ())
    }

    /// Settles the old primary `source` after a promotion of `to` at `epoch`: it becomes a
    /// replica, or it goes (and leaves the record) when the volume keeps no source.
    async fn settle(&self, vol: &VolumeId, source: &Copy, to: &str, epoch: u64) -> Result<()> {
        self.agent(&source.node)?
            .settle(pb::SettleRequest {
                volume_id: vol.to_string(),
                epoch,
                new_primary_node_id: to.to_string(),
                keep: source.info.keep_source,
            })
            .await
            .map_err(|s| peer(&source.node, s))?;
        if !source.info.keep_source {
            self.update_record(vol, |r| {
                r.replicas.retain(|x| x.node != source.node);
            })
            .await?;
        }
        Ok(())
    }

    /// Cancels the hand-offs of a volume that has no primary: its newest fenced copy becomes
    /// the primary again. Another controller (or this one, before a restart) may still be
    /// driving the hand-off, its promotion on the way to the target, so the order matters
    /// (docs/moving.md, "Cancelling a hand-off"): first every other node learns an epoch
    /// above any a promotion can carry and refuses promotions below it from then on, and
    /// refuses to learn it at all if it was promoted already; only then is the copy
    /// unfenced, at that epoch. A node that did not answer fails the cancel, and the CO's
    /// retry tries again.
    async fn cancel_hand_off(&self, vol: &VolumeId, p: &Placement) -> Result<()> {
        p.require_all(vol)?;
        let Some(home) = p.fenced.iter().max_by_key(|c| c.info.epoch) else {
            return Ok(());
        };
        // Every promotion is at the epoch of a fence, and every fence is in the inventories.
        let epoch = p.max_epoch() + 1;
        let raise = |node: String| async move {
            self.agent(&node)?
                .raise_epoch_floor(pb::RaiseEpochFloorRequest {
                    volume_id: vol.to_string(),
                    epoch,
                })
                .await
                .map_err(|s| peer(&node, s))
        };
        // The fence's target first: it is the one node a promotion at the old epoch can
        // reach. If it won the race (it holds the volume now, or is promoting it and holds
        // its lock), the cancel stops here, before any other node gets a floor above the
        // new primary's epoch that would refuse its replication rounds.
        let target = &home.info.fenced_to;
        if target != &home.node && self.node_ids().contains(target) {
            raise(target.clone()).await?;
        }
        // Then the record's other nodes: only they can hold or receive a copy of the volume
        // (a hand-off's target and a round's targets join the record before any data moves).
        let mut others: Vec<String> = p.nodes();
        others.extend(p.record.iter().flat_map(|r| r.record.nodes()));
        others.sort();
        others.dedup();
        let others = others
            .into_iter()
            .filter(|n| n != &home.node && n != target);
        futures::future::try_join_all(others.map(raise)).await?;
        failpoint::hit("cancel:after-floors");
        self.agent(&home.node)?
            .unfence(pb::UnfenceRequest {
                volume_id: vol.to_string(),
                epoch,
            })
            .await
            .map_err(|s| peer(&home.node, s))?;
        tracing::info!(volume.id = %vol, node = %home.node, epoch, "hand-off cancelled: the fenced copy is the primary again");
        failpoint::hit("cancel:after-unfence");
        let home = home.node.clone();
        self.update_record(vol, |r| {
            if r.epoch < epoch {
                r.primary = home.clone();
                r.epoch = epoch;
                r.handoff = None;
                r.replicas.retain(|x| x.node != home);
            }
        })
        .await?;
        Ok(())
    }

    /// Finishes hand-offs whose promotion happened but whose old copy was not settled.
    async fn settle_fenced(&self, vol: &VolumeId, p: &Placement, primary: &Copy) -> Result<()> {
        for f in p
            .fenced
            .iter()
            .filter(|f| f.info.fence_epoch <= primary.info.epoch)
        {
            self.settle(vol, f, &primary.node, f.info.fence_epoch)
                .await?;
        }
        Ok(())
    }

    /// One replication round: cut a shipping snapshot on the primary and bring each target
    /// up to it, incrementally from the newest snapshot both hold. Returns the bytes each
    /// target received.
    pub async fn replicate(
        &self,
        vol: &VolumeId,
        primary: &Copy,
        targets: &[String],
        on_progress: OnProgress<'_>,
    ) -> Result<Vec<(String, u64)>> {
        // The targets join the record before any data moves: a delete, or a cancelled
        // hand-off's epoch floor, then reaches a receive under way there.
        self.update_record(vol, |r| {
            for t in targets {
                if t != &r.primary && !r.replicas.iter().any(|x| &x.node == t) {
                    r.replicas.push(ReplicaPlacement {
                        node: t.clone(),
                        ..Default::default()
                    });
                }
            }
        })
        .await?;
        let p = self.locate(vol).await?;
        // The bases to keep are those of every replica; a silent one's would be pruned.
        p.require_all(vol)?;
        // The primary as it is now: the caller's view may be a poll old, and a base
        // chosen from an old list of snapshots would ship more than the change.
        let primary = match &p.primary {
            Some(c) if c.node == primary.node => c.clone(),
            _ => {
                return Err(Error::Conflict {
                    what: format!("the primary of volume {vol}"),
                    reason: format!("it is no longer on node {}", primary.node),
                });
            }
        };
        let primary = &primary;
        let bases: Vec<(String, Option<String>)> = targets
            .iter()
            .map(|t| {
                let base = p
                    .copy_on(t)
                    .and_then(|c| common_base(&primary.info, &c.info));
                (t.clone(), base)
            })
            .collect();
        // Every base some replica still holds is kept, not only this round's targets'.
        let keep: Vec<String> = p
            .replicas
            .iter()
            .filter_map(|r| common_base(&primary.info, &r.info))
            .collect();
        let cut = self
            .agent(&primary.node)?
            .sync_snapshot(pb::SyncSnapshotRequest {
                volume_id: vol.to_string(),
                keep,
            })
            .await
            .map_err(|s| peer(&primary.node, s))?
            .into_inner();
        let cut_snap = cut.snapshot.unwrap_or_default();
        let (snap, created) = (cut_snap.snapshot_id, cut_snap.created_unix_nanos);
        failpoint::hit("replicate:after-snapshot");
        let mut out = Vec::new();
        for (t, base) in bases {
            let done = self
                .ship(
                    Shipment {
                        vol,
                        from: &primary.node,
                        to: &t,
                        snapshot: &snap,
                        base,
                        epoch: primary.info.epoch,
                        template: cut.template.clone(),
                    },
                    on_progress,
                )
                .await?;
            out.push((t, done.bytes_done));
        }
        let shipped: Vec<String> = out.iter().map(|(t, _)| t.clone()).collect();
        self.update_record(vol, |r| {
            for x in r.replicas.iter_mut().filter(|x| shipped.contains(&x.node)) {
                x.snapshot = snap.clone();
                x.snapshot_time = super::monitor::rfc3339(created);
            }
        })
        .await?;
        Ok(out)
    }

    /// Where a volume's replicas should be: the nodes already holding one, then the nodes
    /// with the most free space, up to `replicas - 1`.
    pub fn replica_targets(
        &self,
        p: &Placement,
        primary: &Copy,
        invs: &[(String, Result<pb::InventoryResponse>)],
    ) -> Vec<String> {
        let want = primary.info.replicas.saturating_sub(1) as usize;
        let mut targets: Vec<String> = p
            .replicas
            .iter()
            .map(|r| r.node.clone())
            .filter(|n| n != &primary.node)
            .take(want)
            .collect();
        let mut free: Vec<(u64, String)> = invs
            .iter()
            .filter_map(|(n, i)| i.as_ref().ok().map(|i| (i.available_bytes, n.clone())))
            // A node holding another copy (a stale primary a failover left, a fenced one)
            // cannot receive a replica until that copy is settled or demoted.
            .filter(|(_, n)| !p.stale.iter().chain(&p.fenced).any(|c| &c.node == n))
            .filter(|(b, n)| {
                n != &primary.node
                    && !targets.contains(n)
                    && *b >= primary.info.capacity_bytes
                    && self.silent(n).is_none()
            })
            .collect();
        free.sort_by(|a, b| b.cmp(a));
        for (_, n) in free {
            if targets.len() >= want {
                break;
            }
            targets.push(n);
        }
        targets
    }
}

/// Replica lag, from inventories: how old the newest snapshot each replica holds is.
pub fn lag_report(p: &Placement, replicas_wanted: u32) -> Option<String> {
    if replicas_wanted <= 1 && p.replicas.is_empty() {
        return None;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let mut parts: Vec<String> = p
        .replicas
        .iter()
        .map(|r| match r.info.shipping.last() {
            Some(s) => format!(
                "{} {}s behind",
                r.node,
                (now - s.created_unix_nanos).max(0) / 1_000_000_000
            ),
            None => format!("{} holds no snapshot yet", r.node),
        })
        .collect();
    let have = p.replicas.len() as u32 + 1;
    if have < replicas_wanted {
        parts.push(format!("{} of {} copies", have, replicas_wanted));
    }
    Some(format!("replicas: {}", parts.join("; ")))
}

type MoveResult = std::result::Result<(), (Code, String)>;
type MoveFuture = Shared<futures::future::BoxFuture<'static, MoveResult>>;

/// Hand-offs in progress in this controller. A publish that times out on the CO's side
/// and is retried joins the move already running instead of starting a second one or
/// failing with ABORTED, so a long first copy completes however often the CO retries.
#[derive(Default)]
pub struct Moves {
    running: Mutex<HashMap<(VolumeId, String), MoveFuture>>,
}

impl std::fmt::Debug for Moves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Moves { .. }")
    }
}

impl Moves {
    pub async fn run(&self, cluster: Arc<Cluster>, vol: VolumeId, to: String) -> Result<()> {
        let key = (vol.clone(), to.clone());
        let fut = {
            let mut running = self.running.lock().expect("moves lock poisoned");
            running
                .entry(key.clone())
                .or_insert_with(|| {
                    let (vol, to) = (vol.clone(), to.clone());
                    async move {
                        // A replication round of the same volume finishes first: the
                        // fence would otherwise drop the snapshot the round is shipping.
                        let r = match cluster.inflight.try_lock([vol.to_string()]) {
                            Ok(_guard) => cluster.hand_off(&vol, &to, &ignore).await,
                            Err(e) => Err(e),
                        };
                        r.map_err(|e| (e.code(), e.to_string()))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        // Driven in its own task, so a cancelled publish does not cancel the move.
        let handle = tokio::spawn(fut.clone());
        let result = handle
            .await
            .unwrap_or_else(|e| Err((Code::Internal, e.to_string())));
        // Only this move's entry: a later caller may already have started the next one.
        let mut running = self.running.lock().expect("moves lock poisoned");
        if running.get(&key).is_some_and(|f| f.ptr_eq(&fut)) {
            running.remove(&key);
        }
        drop(running);
        // The message names its node already ("moving volume … stopped at node …"): a
        // second prefix would name the target for what happened elsewhere.
        result.map_err(|(code, message)| Error::Relayed { code, message })
    }
}

/// Background replication: every second, each primary whose newest replica is older than
/// its interval (or which lacks replicas) gets a round. Rounds of different volumes run
/// concurrently, at most [`rounds::MAX_ROUNDS`] at once (a due volume without a free slot
/// is still due on the next tick); a volume's round never overlaps another operation on it.
pub async fn replication_loop(
    cluster: Arc<Cluster>,
    leader: tokio::sync::watch::Receiver<bool>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let failing: Arc<Mutex<std::collections::HashSet<VolumeId>>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(super::rounds::MAX_ROUNDS));
    loop {
        tick.tick().await;
        if *shutdown.borrow() {
            return;
        }
        // Only the leader schedules rounds: two controllers would cut and prune each
        // other's snapshots. It alone reports replication lag.
        if !*leader.borrow() {
            cluster.metrics.replication_lags(&[]);
            continue;
        }
        // From the nodes' last polls, not a round of calls: a silent node's last inventory
        // still says which replicas it holds, so none is replaced while it is away.
        let invs = cluster.last_inventories();
        let mut lags = Vec::new();
        let mut due = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (_, inv) in &invs {
            let Ok(inv) = inv else { continue };
            for c in &inv.volumes {
                if c.role == pb::Role::Primary as i32
                    && c.replicas > 1
                    && seen.insert(c.volume_id.clone())
                {
                    due.push(c.volume_id.clone());
                }
            }
        }
        for id in due {
            let Some(vol) = VolumeId::parse(&id) else {
                continue;
            };
            let Ok(p) = Placement::of(&vol, &invs) else {
                continue;
            };
            let Some(primary) = p.primary.clone() else {
                continue;
            };
            let mut targets = cluster.replica_targets(&p, &primary, &invs);
            // A target that holds nothing yet is a new replica: the record may know of one
            // on a node whose inventory this controller has not seen (silent since it
            // started), which must not be replaced by a second one elsewhere.
            if targets.iter().any(|t| p.copy_on(t).is_none())
                && let Ok(Some(r)) = cluster.store.get(&vol).await
            {
                let recorded: Vec<String> = r
                    .record
                    .replicas
                    .iter()
                    .map(|x| x.node.clone())
                    .filter(|n| n != &primary.node)
                    .collect();
                if recorded.len() >= targets.len() {
                    targets = recorded.into_iter().take(targets.len()).collect();
                }
            }
            let newest_age_nanos = |node: &str| -> Option<i64> {
                let r = p.replicas.iter().find(|r| r.node == node)?;
                let s = r.info.shipping.last()?;
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .ok()?
                    .as_nanos() as i64;
                Some(now - s.created_unix_nanos)
            };
            let newest_age = |node: &str| newest_age_nanos(node).map(|n| n / 1_000_000_000);
            // The volume's lag is its most-behind replica's; none until every replica
            // holds a first copy.
            if let Some(Some(worst)) = targets
                .iter()
                .map(|t| newest_age_nanos(t))
                .collect::<Option<Vec<i64>>>()
                .map(|ages| ages.into_iter().max())
            {
                lags.push((id.clone(), worst.max(0) as f64 / 1e9));
            }
            // Saturating: records from before the interval was bounded may hold any u64.
            let interval =
                i64::try_from(primary.info.replication_interval_seconds).unwrap_or(i64::MAX);
            let stale = targets
                .iter()
                .any(|t| newest_age(t).is_none_or(|age| age >= interval));
            if targets.is_empty() || !stale {
                continue;
            }
            // A round needs every copy; while one's node is silent the volume waits (its
            // lag grows and is reported), and the other volumes go on.
            if let Some((node, why)) = std::iter::once(&primary.node)
                .chain(&targets)
                .find_map(|n| cluster.silent(n).map(|w| (n.clone(), w)))
            {
                tracing::debug!(volume.id = %vol, node, why, "replication round waits for a silent node");
                continue;
            }
            // No slot: this volume waits for the next tick, and the others are still looked
            // at, so each one's lag is still reported.
            if slots.available_permits() == 0 {
                continue;
            }
            let Ok(guard) = cluster.inflight.try_lock([id.clone()]) else {
                continue;
            };
            let lag: Vec<(String, Option<i64>)> =
                targets.iter().map(|t| (t.clone(), newest_age(t))).collect();
            tracing::debug!(volume.id = %vol, ?lag, "replication round due (seconds behind per replica)");
            let (cluster, failing, pvc) = (cluster.clone(), failing.clone(), p.pvc());
            super::rounds::spawn_capped(&slots, || async move {
                let _guard = guard;
                match cluster.replicate(&vol, &primary, &targets, &ignore).await {
                    Ok(done) => {
                        tracing::info!(volume.id = %vol, shipped = ?done, "replication round done");
                        // The next tick judges the lag from the nodes' polls: make them
                        // show this round.
                        for n in std::iter::once(&primary.node).chain(&targets) {
                            cluster.poll(n).await;
                        }
                        cluster
                            .metrics
                            .replication_round("succeeded", done.iter().map(|(_, b)| b).sum());
                        if failing.lock().expect("failing lock poisoned").remove(&vol) {
                            cluster.pvc_event(
                                pvc,
                                "ReplicationRecovered",
                                format!("replicas of volume {vol} are up to date again"),
                                false,
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(volume.id = %vol, error = %e, "replication round failed");
                        cluster.metrics.replication_round("failed", 0);
                        // One Event when a volume starts failing, not one per retry.
                        if failing
                            .lock()
                            .expect("failing lock poisoned")
                            .insert(vol.clone())
                        {
                            cluster.pvc_event(pvc, "ReplicationFailed", format!("replication of volume {vol} to {targets:?} failed (retrying every second): {e}"), true);
                        }
                    }
                }
            });
        }
        cluster.metrics.replication_lags(&lags);
    }
}
