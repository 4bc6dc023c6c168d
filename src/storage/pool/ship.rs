//! The pool's side of moving volumes between nodes: shipping snapshots, replicas, fences
//! and promotions. The data streams themselves live in `agent::transfer`; here is only what
//! they leave on disk, in the same record-first order as the rest of the pool.
//!
//! A node holds a volume in one of three ways:
//! - **primary**: a volume record without a fence; it alone may be published;
//! - **fenced**: a volume record with a fence: handing off, intact, refusing publishes;
//! - **replica**: a replica record naming a shipping snapshot, no volume image.
//!
//! Every hand-off raises the volume's epoch, so when a crash leaves two nodes claiming a
//! volume the higher epoch is the primary (docs/moving.md).

use std::{fs, path::PathBuf};

use super::Pool;
use crate::{
    error::{Error, Result},
    storage::{loopdev, model::*},
    util::{failpoint, fsutil},
};

impl Pool {
    fn replica_meta(&self, id: &VolumeId) -> PathBuf {
        self.dir.join("replicas").join(format!("{id}.json"))
    }

    /// Beside the replica records, not among them: `replicas()` reads only `.json`.
    fn floor_meta(&self, id: &VolumeId) -> PathBuf {
        self.dir.join("replicas").join(format!("{id}.floor"))
    }

    /// The lowest epoch at which this node may still be promoted to the volume's primary or
    /// keep a replica of it; 0 when no hand-off of it was ever cancelled here.
    pub fn epoch_floor(&self, id: &VolumeId) -> Result<u64> {
        Ok(fsutil::read_json::<EpochFloor>(&self.floor_meta(id))?.map_or(0, |f| f.epoch))
    }

    /// Raises the epoch floor to `epoch` (never lowers it), durably: a cancelled hand-off's
    /// promotion that arrives later, even after a restart, is refused. Refused while this
    /// node holds the volume as a primary (or is making it one): that promotion already
    /// happened, and the hand-off must not be cancelled. The caller holds the volume's
    /// lock, which [`Pool::promote`]'s caller holds too, so a promotion is wholly before or
    /// wholly after this.
    pub fn raise_epoch_floor(&self, id: &VolumeId, epoch: u64) -> Result<()> {
        if let Some(v) = self.volume(id)?
            && (v.fence.is_none() || v.state != RecordState::Ready)
        {
            return Err(Error::FailedPrecondition(format!(
                "node holds volume {id} as a primary at epoch {}",
                v.epoch
            )));
        }
        if self.epoch_floor(id)? < epoch {
            fsutil::write_json(&self.floor_meta(id), &EpochFloor { epoch })?;
        }
        // Every receive of the volume here is for an epoch below the floor now, and would
        // be refused when it ends: its partial image, and the room it holds reserved (a
        // cancelled move's whole volume), go now rather than at the volume's next fetch.
        self.discard_incoming_of(id, |_| false)
    }

    pub fn replica(&self, id: &VolumeId) -> Result<Option<ReplicaRecord>> {
        fsutil::read_json(&self.replica_meta(id))
    }

    pub fn replicas(&self) -> Result<Vec<ReplicaRecord>> {
        self.records("replicas")
    }

    /// Where a snapshot being received is assembled, and the files that let a cut transfer
    /// resume: progress (JSON) and the digests of the chunks applied so far (binary, append
    /// only).
    pub fn incoming(&self, id: &SnapshotId) -> [PathBuf; 3] {
        let d = self.dir.join("incoming");
        [
            d.join(format!("{id}.img")),
            d.join(format!("{id}.json")),
            d.join(format!("{id}.chunks")),
        ]
    }

    /// Drops a receive's partial image and its progress: it starts over next time.
    pub fn discard_incoming(&self, id: &SnapshotId) -> Result<()> {
        let [img, progress, chunks] = self.incoming(id);
        self.trash.put(&img)?;
        fsutil::remove_file_durable(&progress)?;
        fsutil::remove_file_durable(&chunks)
    }

    /// The shipping snapshots of a volume held here, oldest first.
    pub fn shipping_snapshots(&self, vol: &VolumeId) -> Result<Vec<SnapshotRecord>> {
        let mut v: Vec<_> = self
            .snapshots()?
            .into_iter()
            .filter(|s| s.shipping && s.state == RecordState::Ready && &s.source_volume == vol)
            .collect();
        v.sort_by_key(|s| s.created_unix_nanos);
        Ok(v)
    }

    /// Any ready snapshot, shipping ones included: what a peer may ask to be sent.
    pub fn any_ready_snapshot(&self, id: &SnapshotId) -> Result<SnapshotRecord> {
        match self.snapshot(id)? {
            Some(s) if s.state == RecordState::Ready => Ok(s),
            _ => Err(Error::SnapshotNotFound(id.to_string())),
        }
    }

    /// Cuts a point-in-time copy of a primary volume to ship, and drops the volume's older
    /// shipping snapshots except those in `keep` (the bases peers still hold). A reflink of
    /// an image in use is crash-consistent: the filesystem takes the file's I/O lock for the
    /// clone, so writes land wholly before or after it.
    pub async fn cut_shipping_snapshot(
        &self,
        vol: &VolumeId,
        keep: &[SnapshotId],
    ) -> Result<SnapshotRecord> {
        self.shipping_snapshot(vol, keep, false).await
    }

    /// `link`: the snapshot is a hard link to the image, for a fenced volume's final
    /// snapshot. Nothing writes a fenced volume (no publish, stage, expansion or
    /// modification is accepted), so the link is a point-in-time copy that costs nothing,
    /// where a reflink of an image that copy-on-write writes have fragmented costs time
    /// proportional to its extents, inside the cut-over. `unfence` removes the link before
    /// the volume is writable again.
    async fn shipping_snapshot(
        &self,
        vol: &VolumeId,
        keep: &[SnapshotId],
        link: bool,
    ) -> Result<SnapshotRecord> {
        // A fresh name each time: shipping snapshots are never retried by name.
        let name = format!("{vol}/shipping/{}", uuid::Uuid::new_v4());
        let mut rec = match self.start_snapshot(&name, vol, None, !link).await? {
            Ok(rec) => rec,
            Err(existing) => existing,
        };
        rec.shipping = true;
        if link {
            let tmp = self.tmp(&format!("{}.img", rec.id));
            fsutil::remove_file_durable(&tmp)?;
            fs::hard_link(self.volume_image(vol), &tmp).map_err(Error::io("link", &tmp))?;
        } else {
            self.copy_snapshot(&rec).await?;
        }
        let rec = self.finish_snapshot(rec)?;
        for old in self.shipping_snapshots(vol)? {
            if old.id != rec.id && !keep.contains(&old.id) {
                self.delete_snapshot(&old.id)?;
            }
        }
        Ok(rec)
    }

    /// Fences a primary for a hand-off to `to` at `epoch` and cuts the final snapshot.
    /// Repeating the same fence returns the same snapshot; the record is written before the
    /// snapshot is cut, so nothing can be published between the two.
    pub async fn fence(
        &self,
        vol: &VolumeId,
        to: &str,
        epoch: u64,
        keep: &[SnapshotId],
    ) -> Result<(SnapshotRecord, VolumeRecord)> {
        let mut v = self.ready_volume(vol)?;
        match &v.fence {
            Some(f) if f.to == to && f.epoch == epoch => {
                if let Some(s) = &f.snapshot
                    && let Ok(snap) = self.any_ready_snapshot(s)
                {
                    return Ok((snap, v));
                }
            }
            Some(f) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {vol} is already handing off to node {} at epoch {}",
                    f.to, f.epoch
                )));
            }
            None => {
                // Kubernetes detaches a volume by force after 6 minutes, whatever the node
                // still does with it: the publish record is gone, but a database may still
                // write through the staged device. A final snapshot of that is torn, and
                // would ship as verified: a staged copy is not fenced (docs/moving.md).
                if let Some(dev) = loopdev::find(&self.volume_image(vol)).await? {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {vol} is still staged on this node (attached writable as {}); unstage it before it can move",
                        dev.display()
                    )));
                }
                if epoch <= v.epoch {
                    return Err(Error::FailedPrecondition(format!(
                        "hand-off epoch {epoch} is not above the volume's epoch {}",
                        v.epoch
                    )));
                }
                if let Some(node) = v.published.keys().next() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {vol} is still published to node {node}"
                    )));
                }
            }
        }
        v.fence = Some(Fence {
            to: to.to_string(),
            epoch,
            snapshot: None,
        });
        self.save_volume(&v)?;
        failpoint::hit("fence:after-record");
        let snap = self.shipping_snapshot(vol, keep, true).await?;
        v.fence = Some(Fence {
            to: to.to_string(),
            epoch,
            snapshot: Some(snap.id.clone()),
        });
        self.save_volume(&v)?;
        Ok((snap, v))
    }

    /// Cancels a hand-off that never completed: the copy is primary again, at `epoch`, which
    /// the controller chose above every epoch any node may be promoted at, after raising
    /// every other node's floor to it (docs/moving.md, "Cancelling a hand-off"). Repeating
    /// it is success.
    pub fn unfence(&self, vol: &VolumeId, epoch: u64) -> Result<u64> {
        let mut v = self.ready_volume(vol)?;
        let Some(f) = v.fence.clone() else {
            return Ok(v.epoch);
        };
        if epoch <= f.epoch {
            return Err(Error::FailedPrecondition(format!(
                "volume {vol} is fenced at epoch {}; it can only be unfenced above it, not at {epoch}",
                f.epoch
            )));
        }
        // The final snapshot shares the image's inode: it goes before writes can come back,
        // and a Send of it still running sees it gone before its trailer (`transfer::send`).
        if let Some(s) = &f.snapshot {
            self.delete_snapshot(s)?;
        }
        v.fence = None;
        v.epoch = epoch;
        self.save_volume(&v)?;
        Ok(v.epoch)
    }

    /// Makes the replica held here the primary at `epoch`, from its received `snapshot`.
    ///
    /// A volume that is replicated (`replicas` ≥ 2), whose snapshot arrived as a delta
    /// against a base still held here, takes the received image itself, and the base stays
    /// as this node's newest shipping snapshot: a reflink of the received image would cost
    /// time proportional to its extents, and a delta of scattered changes has just
    /// fragmented it (0.75 s for 16,384 changed 4 KiB blocks, inside the cut-over). The
    /// price is that the next shipment from here, planned against the base, carries that
    /// delta once more; the volume's next replication round pays it and moves the common
    /// base forward. Without replication nothing would, and every later move would carry
    /// all changes since the base, so such a volume, and one whose snapshot came whole
    /// (written in order: its clone is cheap), is cloned and keeps the snapshot as the base.
    pub async fn promote(
        &self,
        vol: &VolumeId,
        epoch: u64,
        snapshot: &SnapshotId,
    ) -> Result<VolumeRecord> {
        if let Some(v) = self.volume(vol)?.filter(|v| v.state == RecordState::Ready) {
            if v.fence.is_none() && v.epoch >= epoch {
                // A crash may have come between the volume and the replica record's removal.
                fsutil::remove_file_durable(&self.replica_meta(vol))?;
                return Ok(v);
            }
            return Err(Error::FailedPrecondition(format!(
                "node holds volume {vol} at epoch {} {}; it cannot be promoted to epoch {epoch}",
                v.epoch,
                if v.fence.is_some() { "(fenced)" } else { "" }
            )));
        }
        let floor = self.epoch_floor(vol)?;
        if epoch < floor {
            return Err(Error::FailedPrecondition(format!(
                "a hand-off of volume {vol} at epoch {epoch} was cancelled (this node refuses epochs below {floor})"
            )));
        }
        let r = self
            .replica(vol)?
            .ok_or_else(|| Error::VolumeNotFound(vol.to_string()))?;
        if &r.snapshot != snapshot {
            return Err(Error::FailedPrecondition(format!(
                "the replica of {vol} here is at snapshot {}, not {snapshot}",
                r.snapshot
            )));
        }
        let snap = self.any_ready_snapshot(snapshot)?;
        let src = self.snapshot_image(&snap.id);
        // The image must already have the volume's size: growing a linked image would
        // change the snapshot while it is still Ready.
        let adopt = r.volume.replication.replicas > 1
            && fs::metadata(&src).is_ok_and(|m| m.len() == r.volume.capacity_bytes)
            && r.base.as_ref().is_some_and(|b| {
                self.any_ready_snapshot(b)
                    .is_ok_and(|b| b.shipping && &b.source_volume == vol)
            });
        let record = VolumeRecord {
            state: RecordState::Creating,
            epoch,
            fence: None,
            suspended: false,
            published: Default::default(),
            ..r.volume.clone()
        };
        {
            let _alloc = self.alloc.lock().await;
            if self.volume(vol)?.is_some() {
                // An earlier attempt's record: its reservation is already counted.
                self.discard_volume_data(vol)?;
            } else {
                // The volume reserves its whole capacity, as a created one does. An adopted
                // snapshot's blocks become the volume's, so what the snapshot counts now is
                // not needed twice; a clone keeps the snapshot beside the volume.
                let counted = if adopt {
                    fsutil::allocated_bytes(&src)?.min(snap.size_bytes)
                } else {
                    0
                };
                self.ensure_room(r.volume.capacity_bytes.saturating_sub(counted))
                    .await?;
            }
            self.save_volume(&record)?;
        }
        failpoint::hit("promote:after-record");
        let record = match self.make_promoted(record, &snap, adopt).await {
            Ok(record) => record,
            Err(e) => {
                if let Err(undo) = self.undo_promote(vol, adopt.then_some(&snap)) {
                    tracing::error!(volume.id = %vol, error = %undo, "promotion failed and could not be undone; the next start reconciles it");
                }
                return Err(e);
            }
        };
        if adopt {
            tracing::info!(volume.id = %vol, snapshot.id = %snap.id, base = ?r.base, "volume adopted the received image; the base stays");
        } else {
            tracing::info!(volume.id = %vol, snapshot.id = %snap.id, "volume cloned from the received snapshot");
        }
        failpoint::hit("promote:after-volume");
        if adopt {
            self.delete_snapshot(&snap.id)?;
        }
        fsutil::remove_file_durable(&self.replica_meta(vol))?;
        Ok(record)
    }

    /// The data steps of [`Pool::promote`], from a `Creating` record to a `Ready` one.
    async fn make_promoted(
        &self,
        record: VolumeRecord,
        snap: &SnapshotRecord,
        adopt: bool,
    ) -> Result<VolumeRecord> {
        let vol = &record.id;
        let tmp = self.tmp(&format!("{vol}.img"));
        fsutil::remove_file_durable(&tmp)?;
        let src = self.snapshot_image(&snap.id);
        let (reflink, capacity, tmp2) = (self.reflink, record.capacity_bytes, tmp.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            if adopt {
                fs::hard_link(&src, &tmp2).map_err(Error::io("link", &tmp2))?;
            } else {
                fsutil::clone_file(&src, &tmp2, reflink)?;
            }
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&tmp2)
                .map_err(Error::io("open", &tmp2))?;
            if f.metadata().map_err(Error::io("stat", &tmp2))?.len() != capacity {
                f.set_len(capacity).map_err(Error::io("grow", &tmp2))?;
            }
            f.sync_all().map_err(Error::io("fsync", &tmp2))
        })
        .await
        .expect("promote task panicked")?;
        fsutil::rename_durable(&tmp, &self.volume_image(vol))?;
        if adopt {
            // The snapshot's name goes before the volume can be written through the same
            // inode. A crash from here to Ready leaves neither: the hand-off ships the
            // snapshot again (the old primary still holds it, fenced).
            self.mark_snapshot_deleting(snap)?;
        }
        failpoint::check("promote:before-ready")?;
        let record = VolumeRecord {
            state: RecordState::Ready,
            ..record
        };
        self.save_volume(&record)?;
        Ok(record)
    }

    /// Undoes a promotion that failed with an error rather than a crash, so that this node
    /// can be promoted again, or receive the volume again, without a restart (a `Creating`
    /// record makes it refuse the volume until reconcile removes it). Unlike reconcile, it
    /// keeps an adopted snapshot: the volume never became `Ready`, so nothing wrote the
    /// image they share, and the retry promotes from it without shipping it again. The
    /// snapshot comes back first, so a failure after it still leaves the retry a `Ready`
    /// snapshot to start from. A volume whose `Ready` record is already in place (only its
    /// directory sync failed) is promoted, not undone: another controller may have seen it
    /// as the primary. What cannot be undone here is left for reconcile.
    fn undo_promote(&self, vol: &VolumeId, adopted: Option<&SnapshotRecord>) -> Result<()> {
        if self
            .volume(vol)?
            .is_some_and(|v| v.state == RecordState::Ready)
        {
            return Ok(());
        }
        if let Some(s) = adopted {
            // Only the mark this attempt made is taken back: a snapshot deleted meanwhile
            // (its record gone, or its image already in the trash) stays deleted.
            let marked = self
                .snapshot(&s.id)?
                .is_some_and(|now| now.state == RecordState::Deleting);
            if marked && self.snapshot_image(&s.id).exists() {
                fsutil::write_json(&self.snapshot_meta(&s.id), s)?;
            }
        }
        self.finish_delete_volume(vol)?;
        tracing::warn!(volume.id = %vol, "promotion failed; undone, the replica stays");
        Ok(())
    }

    /// After the new primary took over at `epoch`: the fenced copy here becomes a replica
    /// following it (`keep`), or goes. Repeating is success.
    pub async fn settle(
        &self,
        vol: &VolumeId,
        epoch: u64,
        new_primary: &str,
        keep: bool,
    ) -> Result<()> {
        let Some(v) = self.volume(vol)? else {
            return Ok(());
        };
        let Some(f) = v.fence.clone().filter(|f| f.epoch == epoch) else {
            return Err(Error::FailedPrecondition(format!(
                "volume {vol} is not fenced for epoch {epoch} on this node"
            )));
        };
        self.follow(v, epoch, new_primary, f.snapshot.filter(|_| keep))
            .await
    }

    /// The copy `v` held here turns into a replica of `new_primary` at `epoch` holding
    /// `snapshot` (its record written before the volume goes), or, without a snapshot,
    /// goes with everything of the volume here.
    async fn follow(
        &self,
        v: VolumeRecord,
        epoch: u64,
        new_primary: &str,
        snapshot: Option<SnapshotId>,
    ) -> Result<()> {
        let vol = v.id.clone();
        let Some(snapshot) = snapshot else {
            self.delete_volume(&vol).await?;
            return self.forget(&vol);
        };
        let template = VolumeRecord {
            fence: None,
            suspended: false,
            published: Default::default(),
            state: RecordState::Ready,
            ..v
        };
        fsutil::write_json(
            &self.replica_meta(&vol),
            &ReplicaRecord {
                volume: template,
                epoch,
                primary: new_primary.to_string(),
                snapshot,
                base: None,
            },
        )?;
        self.delete_volume(&vol).await
    }

    /// The copies a lapsed lease fences: replicated primaries, which the controller may
    /// promote a replica of elsewhere once the lease has expired. An unreplicated volume
    /// has nowhere else to live, so fencing it would stop its database for nothing.
    pub fn fenceable(&self) -> Result<Vec<VolumeRecord>> {
        Ok(self
            .volumes()?
            .into_iter()
            .filter(|v| {
                v.state == RecordState::Ready
                    && v.fence.is_none()
                    && !v.suspended
                    && v.replication.replicas > 1
            })
            .collect())
    }

    /// Suspends a primary whose lease lapsed: recorded first, so that no stage or publish
    /// starts after this returns, then every writable device of it is fenced.
    pub async fn suspend(&self, vol: &VolumeId) -> Result<()> {
        let mut v = self.ready_volume(vol)?;
        if !v.suspended {
            v.suspended = true;
            self.save_volume(&v)?;
        }
        for dev in loopdev::all_for(&self.volume_image(vol)).await? {
            if !dev.read_only && !dev.fenced {
                loopdev::set_fenced(&dev.device, true)?;
            }
        }
        Ok(())
    }

    /// Gives a suspended primary its writes back, at `epoch`: the controller recorded this
    /// node as the primary at `epoch` by compare-and-swap, so no promotion elsewhere can
    /// have happened or still happen at it. The devices come back before the record, so a
    /// crash between leaves a copy that refuses new stages until resumed again, never one
    /// recorded writable and still fenced. Repeating is success.
    pub async fn resume(&self, vol: &VolumeId, epoch: u64) -> Result<u64> {
        let mut v = self.ready_volume(vol)?;
        if !v.suspended && v.epoch >= epoch {
            return Ok(v.epoch);
        }
        if v.fence.is_some() || epoch < v.epoch || epoch < self.epoch_floor(vol)? {
            return Err(Error::FailedPrecondition(format!(
                "volume {vol} is held here at epoch {}{}; it cannot resume at epoch {epoch}",
                v.epoch,
                if v.fence.is_some() {
                    " (handing off)"
                } else {
                    ""
                }
            )));
        }
        for dev in loopdev::all_for(&self.volume_image(vol)).await? {
            if dev.fenced {
                loopdev::set_fenced(&dev.device, false)?;
            }
        }
        v.suspended = false;
        v.epoch = epoch;
        self.save_volume(&v)?;
        Ok(v.epoch)
    }

    /// After the volume failed over to `new_primary` at `epoch`: this stale copy keeps
    /// what it holds as the CSI snapshot `kept` (the writes it took after its last
    /// shipment, for an operator: never merged, never dropped), and becomes a replica of
    /// the new primary from its newest shipping snapshot, the base the two copies share,
    /// so the next round ships only what differs. Without a shipping snapshot it is
    /// removed. Refused while the copy is still attached here. Repeating is success.
    pub async fn demote(
        &self,
        vol: &VolumeId,
        epoch: u64,
        new_primary: &str,
        kept: &str,
    ) -> Result<Option<SnapshotRecord>> {
        let Some(mut v) = self.volume(vol)? else {
            return Ok(self
                .snapshot(&SnapshotId::for_name(kept))?
                .filter(|s| s.state == RecordState::Ready));
        };
        if v.state == RecordState::Ready && v.epoch >= epoch {
            return Err(Error::FailedPrecondition(format!(
                "node holds volume {vol} at epoch {}, not below {epoch}",
                v.epoch
            )));
        }
        if let Some(dev) = loopdev::all_for(&self.volume_image(vol)).await?.first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {vol} is still attached here as {}; unstage it before it can follow node {new_primary}",
                dev.device.display()
            )));
        }
        let snap = if v.state == RecordState::Ready {
            Some(match self.begin_snapshot(kept, vol, None).await? {
                Ok(rec) => {
                    self.copy_snapshot(&rec).await?;
                    self.finish_snapshot(rec)?
                }
                Err(done) => done,
            })
        } else {
            None
        };
        // Its publishes are the lost node's, which the controller already let go.
        if !v.published.is_empty() {
            v.published.clear();
            self.save_volume(&v)?;
        }
        let base = self.shipping_snapshots(vol)?.pop().map(|b| b.id);
        self.follow(v, epoch, new_primary, base).await?;
        Ok(snap)
    }

    /// Removes every copy of a volume here that is not a volume record: the replica record,
    /// shipping snapshots and half-received images. Gone is success.
    pub fn forget(&self, vol: &VolumeId) -> Result<()> {
        fsutil::remove_file_durable(&self.replica_meta(vol))?;
        // A volume made again under the same name (ids derive from names) starts at epoch 0.
        fsutil::remove_file_durable(&self.floor_meta(vol))?;
        for s in self.shipping_snapshots(vol)? {
            self.delete_snapshot(&s.id)?;
        }
        self.discard_incoming_of(vol, |_| false)
    }

    /// Drops the partial receives of `vol`'s snapshots except those `keep` names.
    pub fn discard_incoming_of(
        &self,
        vol: &VolumeId,
        keep: impl Fn(&SnapshotId) -> bool,
    ) -> Result<()> {
        for progress in self.incoming_progress()? {
            if &progress.volume == vol && !keep(&progress.snapshot) {
                self.discard_incoming(&progress.snapshot)?;
            }
        }
        Ok(())
    }

    /// Removes what a receive left in `incoming/` for snapshots that arrived since (a crash
    /// between the rename and the cleanup), and partial images whose receive never
    /// recorded its progress. Partial receives with progress stay, and keep their
    /// reservation: they resume.
    pub(super) fn tidy_incoming(&self) -> Result<()> {
        let dir = self.dir.join("incoming");
        for e in fs::read_dir(&dir)
            .map_err(Error::io("list", &dir))?
            .flatten()
        {
            let p = e.path();
            let Some(id) = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(SnapshotId::parse)
            else {
                continue;
            };
            // A partial image without its progress file (a crash before the receive
            // reserved room) can never resume, and would hold space nothing accounts for.
            let orphan =
                p.extension().is_some_and(|x| x != "json") && !self.incoming(&id)[1].exists();
            if orphan || self.any_ready_snapshot(&id).is_ok() {
                fsutil::remove_file_durable(&p)?;
            }
        }
        Ok(())
    }

    /// Reserves room for a receive before any of its data is written, and records the
    /// reservation in its progress file: from then on GetCapacity and every other
    /// reservation count it, a crash keeps it (the partial image stays, to resume), and
    /// accepting or discarding the receive releases it. `st.reserved_bytes` is what the
    /// receive may write: the plan's data bytes, each of which may need a block of its own
    /// (in a clone of the base, a write is copied on write). Zero pieces free space, and
    /// the clone shares its base's blocks, so neither needs room. RESOURCE_EXHAUSTED when
    /// it does not fit: a receive must not take the room promised to the volumes here.
    pub async fn reserve_incoming(&self, st: &IncomingProgress) -> Result<()> {
        let [_, progress, _] = self.incoming(&st.snapshot);
        let _alloc = self.alloc.lock().await;
        self.ensure_room(st.reserved_bytes).await?;
        fsutil::write_json(&progress, st)
    }

    /// What the receives under way or cut short hold reserved (their progress files).
    pub(super) fn incoming_reserved(&self) -> Result<u64> {
        Ok(self
            .incoming_progress()?
            .iter()
            .map(|p| p.reserved_bytes)
            .sum())
    }

    /// The progress records of the receives here (an unreadable one is skipped: it is
    /// rewritten whole at each checkpoint, so only damage from outside leaves one).
    fn incoming_progress(&self) -> Result<Vec<IncomingProgress>> {
        let dir = self.dir.join("incoming");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir)
            .map_err(Error::io("list", &dir))?
            .flatten()
        {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json")
                && let Ok(Some(progress)) = fsutil::read_json::<IncomingProgress>(&p)
            {
                out.push(progress);
            }
        }
        Ok(out)
    }

    /// Publishes a fully received and verified image as a snapshot here.
    pub fn accept_incoming(&self, rec: SnapshotRecord) -> Result<SnapshotRecord> {
        let [img, progress, chunks] = self.incoming(&rec.id);
        let rec = SnapshotRecord {
            state: RecordState::Ready,
            reserved_bytes: 0,
            ..rec
        };
        // Record first (as Creating, so a crash before the rename is cleaned up), then the
        // image, then Ready.
        fsutil::write_json(
            &self.snapshot_meta(&rec.id),
            &SnapshotRecord {
                state: RecordState::Creating,
                ..rec.clone()
            },
        )?;
        fsutil::rename_durable(&img, &self.snapshot_image(&rec.id))?;
        fsutil::write_json(&self.snapshot_meta(&rec.id), &rec)?;
        fsutil::remove_file_durable(&progress)?;
        fsutil::remove_file_durable(&chunks)?;
        Ok(rec)
    }

    /// Records the newest replica of a volume here and drops the shipping snapshots it no
    /// longer needs: the newest is the base for the next round, and for a replicated volume
    /// the one it was shipped against lets a promotion adopt the newest's image (see
    /// [`Pool::promote`]).
    pub fn set_replica(&self, rec: &ReplicaRecord) -> Result<()> {
        fsutil::write_json(&self.replica_meta(&rec.volume.id), rec)?;
        let base = rec
            .base
            .as_ref()
            .filter(|_| rec.volume.replication.replicas > 1);
        for s in self.shipping_snapshots(&rec.volume.id)? {
            if s.id != rec.snapshot && Some(&s.id) != base {
                self.delete_snapshot(&s.id)?;
            }
        }
        Ok(())
    }
}

/// A node's epoch floor for one volume (`Pool::raise_epoch_floor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct EpochFloor {
    epoch: u64,
}

/// How far a receive got: enough to resume it without starting over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IncomingProgress {
    pub volume: VolumeId,
    pub snapshot: SnapshotId,
    pub base: Option<SnapshotId>,
    /// The sender's plan digest: a resume continues only the same plan.
    pub plan_digest: String,
    /// Every chunk before this offset is applied and durable.
    pub next_offset: u64,
    /// How many chunk digests the `.chunks` file holds for those chunks.
    pub chunks: u64,
    pub bytes_done: u64,
    /// Room the receive holds in the pool until it is accepted or discarded: the bytes of
    /// data it may write (see [`Pool::reserve_incoming`]). Absent in records of older
    /// versions, which reserved nothing.
    #[serde(default)]
    pub reserved_bytes: u64,
}
