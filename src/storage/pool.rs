//! The pool: volume and snapshot images plus their records, on one filesystem.
//!
//! Layout under the pool root (records sit beside their images on the same filesystem, so
//! a rename is atomic across both and the data never outlives its description):
//!
//! ```text
//! berth/volumes/<vol-id>.img  .json
//! berth/snapshots/<snap-id>.img  .json
//! berth/groups/<group-id>.json
//! berth/tmp/                  images being built; never visible as volumes
//! berth/replicas/<vol-id>.json copies of other nodes' volumes (see `ship`)
//! berth/replicas/<vol-id>.floor epochs below it are refused here (a cancelled hand-off)
//! berth/incoming/             images being received from a peer, with their progress
//! berth/trash/                images deleted, being unlinked in the background
//! ```
//!
//! Every change follows one order: write the record (`Creating`/`Deleting`), change the
//! data, write the record again. A crash leaves a record saying what was under way, and
//! [`Pool::reconcile`] or the retried RPC finishes or undoes it.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
};

use tokio::sync::Mutex;

mod ship;
pub use ship::IncomingProgress;

use super::{loopdev, model::*};
use crate::{
    error::{Error, Result},
    util::{
        exec, failpoint,
        fsutil::{self, CopyMethod},
    },
};

/// Sizes are multiples of this: loop devices want 512-byte sectors and filesystems want
/// whole blocks; a MiB keeps every filesystem and device alignment happy.
pub const ALIGN: u64 = MIB;
pub const DEFAULT_VOLUME_BYTES: u64 = GIB;

#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    dir: PathBuf,
    reflink: bool,
    /// Serializes "is there room?" with "record the reservation", so two concurrent creates
    /// cannot both take the last free space.
    alloc: Mutex<()>,
    trash: Trash,
    /// For a pool that is a sparse image file: a directory on the host filesystem holding
    /// it. The pool can write no more than that filesystem has free, whatever its own size.
    host: Option<PathBuf>,
}

/// Where deleted images go to be unlinked off the caller's path. XFS frees (or un-shares)
/// the extents of a file's last link inside the unlink call: 0.2–0.9 s for a 2 GiB
/// shipping snapshot here, more for a fragmented or fully written image. A delete renames
/// the image into `trash/` (O(1) and durable) and a background thread unlinks it, so a
/// hand-off's fence or settle and a DeleteVolume cost a rename. Space that is still in the
/// trash is not counted as free; [`Pool::ensure_room`] empties it before refusing a request.
#[derive(Debug)]
struct Trash {
    dir: PathBuf,
    wake: mpsc::Sender<()>,
    /// Held while the trash is being emptied: an unlink that is under way frees its
    /// space only when it returns, and [`Trash::reclaim`] must wait for that.
    emptying: Arc<std::sync::Mutex<()>>,
}

impl Trash {
    /// Starts the reaper, which first empties what an earlier process left. It ends when
    /// the pool is dropped.
    fn start(dir: PathBuf) -> Result<Trash> {
        let (wake, rx) = mpsc::channel::<()>();
        let emptying = Arc::new(std::sync::Mutex::new(()));
        let (d, lock) = (dir.clone(), emptying.clone());
        std::thread::Builder::new()
            .name("berth-trash".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    while rx.try_recv().is_ok() {}
                    let _emptying = lock.lock().unwrap_or_else(|e| e.into_inner());
                    empty(&d);
                }
            })
            .map_err(Error::io("start the trash reaper in", &dir))?;
        let _ = wake.send(());
        Ok(Trash {
            dir,
            wake,
            emptying,
        })
    }

    /// Empties the trash now, after any unlink the reaper has under way: when this
    /// returns, the space of everything deleted before the call is free. The unlinks take
    /// seconds for big or fragmented images, so they run off the async workers.
    async fn reclaim(&self) {
        let (dir, emptying) = (self.dir.clone(), self.emptying.clone());
        tokio::task::spawn_blocking(move || {
            let _emptying = emptying.lock().unwrap_or_else(|e| e.into_inner());
            empty(&dir);
        })
        .await
        .expect("emptying the trash panicked");
    }

    /// Moves `image` into the trash; an image already gone is success.
    fn put(&self, image: &Path) -> Result<()> {
        let name = image.file_name().expect("images have a file name");
        let to = self.dir.join(format!(
            "{}-{}",
            uuid::Uuid::new_v4().simple(),
            name.to_string_lossy()
        ));
        match fs::rename(image, &to) {
            Ok(()) => {
                fsutil::sync_dir(image.parent().expect("images have a parent"))?;
                let _ = self.wake.send(());
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("move to the trash", image)(e)),
        }
    }
}

/// Unlinks everything in the trash. Not durable on purpose: whatever a crash brings back
/// is unlinked again by the next reaper.
fn empty(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        match fs::remove_file(e.path()) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot unlink a deleted image")
            }
        }
    }
}

/// A CreateVolume request in berth's terms.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: String,
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub kind: VolumeKind,
    pub source: Option<VolumeSource>,
    pub settings: MutableSettings,
    pub labels: std::collections::BTreeMap<String, String>,
    pub replication: Replication,
}

#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// What volumes and snapshots are promised (reported in /metrics).
    pub reserved_bytes: u64,
    /// What the filesystem has allocated (reported in /metrics).
    pub used_bytes: u64,
}

impl Pool {
    /// Opens the pool rooted at `root` (an already mounted filesystem), creating its layout.
    pub async fn open(root: &Path) -> Result<Pool> {
        let dir = root.join("berth");
        for sub in [
            "volumes",
            "snapshots",
            "groups",
            "tmp",
            "replicas",
            "incoming",
            "trash",
        ] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(Error::io("create", &d))?;
        }
        let reflink = probe_reflink(&dir.join("tmp"))?;
        if reflink {
            // Allocation hints inherited by every new image: writes into holes allocate whole
            // 1 MiB extents, which keeps sequentially written volumes at a handful of extents.
            // They do not bound the cost of a reflink after random writes: that follows the
            // file's mapping records, which written/unwritten and shared/unshared boundaries
            // split regardless (docs/BENCHMARKS.md measures both).
            for sub in ["volumes", "snapshots", "tmp"] {
                let d = dir.join(sub);
                let _ = exec::run(
                    "xfs_io",
                    [
                        "-c".as_ref(),
                        "extsize 1m".as_ref(),
                        "-c".as_ref(),
                        "cowextsize 1m".as_ref(),
                        d.as_os_str(),
                    ],
                )
                .await;
            }
        } else {
            tracing::warn!(pool = %root.display(), "pool filesystem has no reflink support: snapshots and clones fall back to sparse copies, which take time proportional to the data");
        }
        Ok(Pool {
            root: root.to_owned(),
            trash: Trash::start(dir.join("trash"))?,
            dir,
            reflink,
            alloc: Mutex::new(()),
            host: None,
        })
    }

    /// Bounds the pool's free space by that of the host filesystem holding `dir`, where the
    /// pool's image file lives (the embedded default). Without the bound a pool larger than
    /// its host promises space the host cannot give; the first write past it fails inside
    /// the pool's XFS, which shuts down and takes every volume of the node with it.
    pub fn bounded_by_host(mut self, dir: &Path) -> Pool {
        self.host = Some(dir.to_owned());
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn reflink(&self) -> bool {
        self.reflink
    }

    pub fn volume_image(&self, id: &VolumeId) -> PathBuf {
        self.dir.join("volumes").join(format!("{id}.img"))
    }
    fn volume_meta(&self, id: &VolumeId) -> PathBuf {
        self.dir.join("volumes").join(format!("{id}.json"))
    }
    /// Where volume images live: loop devices backed by files here are berth's.
    pub fn volumes_dir(&self) -> PathBuf {
        self.dir.join("volumes")
    }
    /// Where deleted images wait to be unlinked (see [`Trash`]).
    pub fn trash_dir(&self) -> PathBuf {
        self.trash.dir.clone()
    }
    pub fn snapshot_image(&self, id: &SnapshotId) -> PathBuf {
        self.dir.join("snapshots").join(format!("{id}.img"))
    }
    fn snapshot_meta(&self, id: &SnapshotId) -> PathBuf {
        self.dir.join("snapshots").join(format!("{id}.json"))
    }
    fn group_meta(&self, id: &GroupSnapshotId) -> PathBuf {
        self.dir.join("groups").join(format!("{id}.json"))
    }
    fn tmp(&self, name: &str) -> PathBuf {
        self.dir.join("tmp").join(name)
    }

    /// Ready when the pool directory accepts a durable write.
    pub fn probe(&self) -> Result<()> {
        // Per call: the CO's sidecars probe at once, and a controller and a node may share
        // the pool; two probes of one name would remove each other's file.
        let p = self.tmp(&format!(".probe-{}", fsutil::unique_suffix()));
        fsutil::write_atomic(&p, b"ok").map_err(|e| Error::PoolUnavailable(e.to_string()))?;
        fsutil::remove_file_durable(&p).map_err(|e| Error::PoolUnavailable(e.to_string()))
    }

    // ---- records -------------------------------------------------------------------

    pub fn volume(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        fsutil::read_json(&self.volume_meta(id))
    }

    /// A volume that exists and is fully created, else NOT_FOUND.
    pub fn ready_volume(&self, id: &VolumeId) -> Result<VolumeRecord> {
        match self.volume(id)? {
            Some(v) if v.state == RecordState::Ready => Ok(v),
            _ => Err(Error::VolumeNotFound(id.to_string())),
        }
    }

    pub fn save_volume(&self, v: &VolumeRecord) -> Result<()> {
        fsutil::write_json(&self.volume_meta(&v.id), v)
    }

    pub fn snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotRecord>> {
        fsutil::read_json(&self.snapshot_meta(id))
    }

    /// A snapshot a CO may name: ready, and not one berth cut for shipping.
    pub fn ready_snapshot(&self, id: &SnapshotId) -> Result<SnapshotRecord> {
        match self.snapshot(id)? {
            Some(s) if s.state == RecordState::Ready && !s.shipping => Ok(s),
            _ => Err(Error::SnapshotNotFound(id.to_string())),
        }
    }

    pub fn group(&self, id: &GroupSnapshotId) -> Result<Option<GroupSnapshotRecord>> {
        fsutil::read_json(&self.group_meta(id))
    }

    pub fn save_group(&self, g: &GroupSnapshotRecord) -> Result<()> {
        fsutil::write_json(&self.group_meta(&g.id), g)
    }

    /// Deletes a group snapshot: marked `deleting`, then the snapshots it made, then its
    /// record. Only snapshots whose own record names the group are deleted, so a group cut
    /// short before all members existed never removes anything else. Used by
    /// DeleteVolumeGroupSnapshot, by a failed CreateVolumeGroupSnapshot, and by repair.
    pub fn delete_group(&self, g: &GroupSnapshotRecord) -> Result<()> {
        if g.state != RecordState::Deleting {
            self.save_group(&GroupSnapshotRecord {
                state: RecordState::Deleting,
                ..g.clone()
            })?;
        }
        for s in &g.snapshots {
            if self
                .snapshot(s)?
                .is_some_and(|r| r.group.as_ref() == Some(&g.id))
            {
                self.delete_snapshot(s)?;
            }
        }
        fsutil::remove_file_durable(&self.group_meta(&g.id))
    }

    fn records<T: serde::de::DeserializeOwned>(&self, sub: &str) -> Result<Vec<T>> {
        fsutil::read_records(&self.dir.join(sub))
    }

    /// All volume records, sorted by id.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.records("volumes")
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.records("snapshots")
    }

    pub fn groups(&self) -> Result<Vec<GroupSnapshotRecord>> {
        self.records("groups")
    }

    // ---- capacity ------------------------------------------------------------------

    /// What the pool can still promise. Volumes are thin images but every byte of their
    /// capacity is reserved (a database must never see ENOSPC below its PVC size), and a
    /// snapshot reserves what it holds allocated: shared with its volume today, but every
    /// block the volume overwrites becomes the snapshot's alone.
    pub fn capacity(&self) -> Result<Capacity> {
        let fs = fsutil::fs_stats(&self.root)?;
        let (mut reserved, mut held) = (0u64, 0u64);
        for v in self.volumes()? {
            reserved += v.capacity_bytes;
            held += fsutil::allocated_bytes(&self.volume_image(&v.id)).unwrap_or(0);
        }
        for s in self.snapshots()? {
            reserved += match s.state {
                // Capped at its size, for the same reason as at begin_snapshot.
                RecordState::Ready => fsutil::allocated_bytes(&self.snapshot_image(&s.id))
                    .unwrap_or(0)
                    .min(s.size_bytes),
                RecordState::Creating | RecordState::Deleting => s.reserved_bytes,
            };
        }
        reserved += self.incoming_reserved()?;
        let by_reservation = fs.total_bytes.saturating_sub(reserved);
        // Space used outside berth's accounting (fs metadata, an admin's files in a
        // --pool-dir) only shows in the real free space: what volumes already hold is inside
        // their reservations, what they may still write is not free.
        //
        // An image file's pool writes into the host: it has no more room than the host has
        // free. The pool is mounted with discard, so what it frees is a hole in the image
        // again, and its own free blocks need host space to be written.
        let mut free = fs.available_bytes;
        if let Some(host) = &self.host {
            free = free.min(fsutil::fs_stats(host)?.available_bytes);
        }
        let by_free_space = (free + held).saturating_sub(reserved);
        Ok(Capacity {
            total_bytes: fs.total_bytes,
            available_bytes: align_down(by_reservation.min(by_free_space)),
            reserved_bytes: reserved,
            used_bytes: fs.used_bytes,
        })
    }

    async fn ensure_room(&self, bytes: u64) -> Result<()> {
        let mut cap = self.capacity()?;
        if bytes > cap.available_bytes {
            self.trash.reclaim().await;
            cap = self.capacity()?;
        }
        if bytes > cap.available_bytes {
            return Err(Error::NoSpace {
                requested: bytes,
                available: cap.available_bytes,
            });
        }
        Ok(())
    }

    // ---- volumes -------------------------------------------------------------------

    /// Creates (or finds, for a retry) the volume for `req.name`.
    pub async fn create_volume(&self, req: NewVolume) -> Result<VolumeRecord> {
        let id = VolumeId::for_name(&req.name);
        // A retry of a finished create answers from the record, even if its source has been
        // deleted since.
        if let Some(existing) = self.volume(&id)?.filter(|v| v.state == RecordState::Ready) {
            return compatible_volume(existing, &req);
        }
        let source_bytes = match &req.source {
            None => 0,
            Some(VolumeSource::Snapshot(s)) => self.ready_snapshot(s)?.size_bytes,
            Some(VolumeSource::Volume(v)) => self.ready_volume(v)?.capacity_bytes,
        };
        let min = match &req.kind {
            VolumeKind::Filesystem { fs_type } => fs_type.min_bytes(),
            VolumeKind::Block => ALIGN,
        };
        let capacity = size_for(req.required_bytes, req.limit_bytes, min.max(source_bytes))?;
        if let Some(src) = &req.source {
            self.check_source_kind(src, &req.kind)?;
        }

        let record = {
            let _alloc = self.alloc.lock().await;
            match self.volume(&id)? {
                Some(existing) if existing.state == RecordState::Ready => {
                    return compatible_volume(existing, &req);
                }
                Some(existing) if existing.state == RecordState::Deleting => {
                    self.finish_delete_volume(&existing.id)?;
                }
                // A previous attempt crashed half-way: nothing of it was acknowledged, so it is
                // discarded and built again from the start.
                Some(_) => self.discard_volume_data(&id)?,
                None => {}
            }
            self.ensure_room(capacity).await?;
            let record = VolumeRecord {
                id: id.clone(),
                name: req.name.clone(),
                capacity_bytes: capacity,
                kind: req.kind.clone(),
                source: req.source.clone(),
                settings: req.settings.clone(),
                labels: req.labels.clone(),
                state: RecordState::Creating,
                published: Default::default(),
                created_unix_nanos: now_nanos(),
                epoch: 0,
                fence: None,
                suspended: false,
                replication: req.replication.clone(),
            };
            self.save_volume(&record)?;
            record
        };
        failpoint::hit("create-volume:after-record");

        let tmp = self.tmp(&format!("{id}.img"));
        fsutil::remove_file_durable(&tmp)?;
        let src = record.source.as_ref().map(|s| match s {
            VolumeSource::Snapshot(s) => self.snapshot_image(s),
            VolumeSource::Volume(v) => self.volume_image(v),
        });
        let reflink = self.reflink;
        let preallocate = record.settings.preallocate;
        let tmp2 = tmp.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            match src {
                Some(src) => {
                    fsutil::clone_file(&src, &tmp2, reflink)?;
                    let f = fs::OpenOptions::new()
                        .write(true)
                        .open(&tmp2)
                        .map_err(Error::io("open", &tmp2))?;
                    f.set_len(capacity).map_err(Error::io("grow", &tmp2))?;
                    finish_image(&f, &tmp2, capacity, preallocate)
                }
                None => {
                    let f = File::create_new(&tmp2).map_err(Error::io("create", &tmp2))?;
                    f.set_len(capacity).map_err(Error::io("truncate", &tmp2))?;
                    finish_image(&f, &tmp2, capacity, preallocate)
                }
            }
        })
        .await
        .expect("image task panicked")?;
        failpoint::hit("create-volume:after-image");

        fsutil::rename_durable(&tmp, &self.volume_image(&id))?;
        failpoint::hit("create-volume:after-rename");

        let record = VolumeRecord {
            state: RecordState::Ready,
            ..record
        };
        self.save_volume(&record)?;
        Ok(record)
    }

    fn check_source_kind(&self, src: &VolumeSource, kind: &VolumeKind) -> Result<()> {
        let source_kind = match src {
            VolumeSource::Snapshot(s) => {
                let snap = self.ready_snapshot(s)?;
                match (snap.kind, self.volume(&snap.source_volume)?) {
                    (Some(kind), _) => kind,
                    // A record from before snapshots kept their kind: the source tells, while
                    // it exists.
                    (None, Some(v)) => v.kind,
                    // Neither tells, so any kind is allowed (a filesystem restored from a
                    // block volume's data shows at stage as a filesystem mismatch).
                    (None, None) => return Ok(()),
                }
            }
            VolumeSource::Volume(v) => self.ready_volume(v)?.kind,
        };
        let same_family = matches!(
            (&source_kind, kind),
            (VolumeKind::Block, VolumeKind::Block)
                | (VolumeKind::Filesystem { .. }, VolumeKind::Filesystem { .. })
        );
        if !same_family || (matches!(kind, VolumeKind::Filesystem { .. }) && &source_kind != kind) {
            return Err(Error::invalid(
                "volume_content_source",
                format!("source holds a {source_kind:?} volume, the request asks for {kind:?}"),
            ));
        }
        Ok(())
    }

    /// Deletes a volume; one that does not exist is success. A volume that is published or
    /// attached on this node is refused: its data is in use.
    pub async fn delete_volume(&self, id: &VolumeId) -> Result<()> {
        let Some(mut v) = self.volume(id)? else {
            return Ok(());
        };
        if !v.published.is_empty() {
            let nodes: Vec<_> = v.published.keys().cloned().collect();
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published to {nodes:?}"
            )));
        }
        if let Some(dev) = loopdev::all_for(&self.volume_image(id))
            .await?
            .first()
            .map(|l| l.device.clone())
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still attached as {} on this node",
                dev.display()
            )));
        }
        if v.state != RecordState::Deleting {
            v.state = RecordState::Deleting;
            self.save_volume(&v)?;
        }
        failpoint::hit("delete-volume:after-mark");
        self.finish_delete_volume(id)
    }

    fn discard_volume_data(&self, id: &VolumeId) -> Result<()> {
        fsutil::remove_file_durable(&self.tmp(&format!("{id}.img")))?;
        self.trash.put(&self.volume_image(id))
    }

    fn finish_delete_volume(&self, id: &VolumeId) -> Result<()> {
        self.discard_volume_data(id)?;
        fsutil::remove_file_durable(&self.volume_meta(id))
    }

    /// Grows a volume's image. Returns the new capacity. Growing to a size it already has is
    /// success (the spec's idempotency), shrinking is refused.
    pub async fn expand_volume(
        &self,
        id: &VolumeId,
        required: u64,
        limit: u64,
    ) -> Result<VolumeRecord> {
        let _alloc = self.alloc.lock().await;
        let mut v = self.ready_volume(id)?;
        refuse_fenced(&v)?;
        let image = self.volume_image(id);
        if limit != 0 && limit < v.capacity_bytes {
            return Err(Error::OutOfRange(format!(
                "limit_bytes {limit} is below the volume's current size {} (volumes never shrink)",
                v.capacity_bytes
            )));
        }
        let target = size_for(required, limit, v.capacity_bytes)?;
        if target > v.capacity_bytes {
            self.ensure_room(target - v.capacity_bytes).await?;
            let img = image.clone();
            let preallocate = v.settings.preallocate;
            tokio::task::spawn_blocking(move || -> Result<()> {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(&img)
                    .map_err(Error::io("open", &img))?;
                f.set_len(target).map_err(Error::io("grow", &img))?;
                finish_image(&f, &img, target, preallocate)
            })
            .await
            .expect("grow task panicked")?;
            failpoint::hit("expand-volume:after-truncate");
            v.capacity_bytes = target;
            self.save_volume(&v)?;
        }
        // A device attached on this node keeps its old size until told to look again; doing
        // it here means a block volume needs no node step at all.
        for dev in loopdev::all_for(&image).await? {
            loopdev::refresh_capacity(&dev.device).await?;
        }
        Ok(v)
    }

    /// Applies new mutable settings to a volume (ControllerModifyVolume).
    pub async fn modify_volume(
        &self,
        id: &VolumeId,
        settings: MutableSettings,
    ) -> Result<VolumeRecord> {
        let mut v = self.ready_volume(id)?;
        refuse_fenced(&v)?;
        if settings.preallocate && !v.settings.preallocate {
            let _alloc = self.alloc.lock().await;
            let img = self.volume_image(id);
            let cap = v.capacity_bytes;
            tokio::task::spawn_blocking(move || -> Result<()> {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(&img)
                    .map_err(Error::io("open", &img))?;
                finish_image(&f, &img, cap, true)
            })
            .await
            .expect("preallocate task panicked")?;
        }
        v.settings = settings;
        self.save_volume(&v)?;
        Ok(v)
    }

    // ---- snapshots -----------------------------------------------------------------

    /// First step of a snapshot: validates, reserves, records `Creating`. Returns `Ok(Err(rec))`
    /// when a compatible snapshot already exists (a retry), so the caller can answer at once.
    pub async fn begin_snapshot(
        &self,
        name: &str,
        source: &VolumeId,
        group: Option<&GroupSnapshotId>,
    ) -> Result<std::result::Result<SnapshotRecord, SnapshotRecord>> {
        self.start_snapshot(name, source, group, true).await
    }

    /// [`Pool::begin_snapshot`]; `copy`: the snapshot will be a copy that may come to hold
    /// blocks of its own, and needs room for them. A hard link (a fenced volume's final
    /// snapshot) never will: a nearly full node must still be able to hand a volume off.
    async fn start_snapshot(
        &self,
        name: &str,
        source: &VolumeId,
        group: Option<&GroupSnapshotId>,
        copy: bool,
    ) -> Result<std::result::Result<SnapshotRecord, SnapshotRecord>> {
        let id = SnapshotId::for_name(name);
        let _alloc = self.alloc.lock().await;
        match self.snapshot(&id)? {
            Some(s) if s.state == RecordState::Ready => {
                if &s.source_volume != source {
                    return Err(Error::AlreadyExists {
                        kind: "snapshot",
                        name: name.to_string(),
                        detail: format!("it was taken of volume {}", s.source_volume),
                    });
                }
                return Ok(Err(s));
            }
            Some(s) if s.state == RecordState::Deleting => self.finish_delete_snapshot(&s.id)?,
            Some(_) => fsutil::remove_file_durable(&self.tmp(&format!("{id}.img")))?,
            None => {}
        }
        let vol = self.ready_volume(source)?;
        // What the snapshot may come to hold alone: the volume's allocated blocks, but never
        // more than its size (XFS can show more allocated than written while it holds CoW
        // reservations, which would refuse snapshots on a nearly full pool for nothing).
        let needed = if copy {
            fsutil::allocated_bytes(&self.volume_image(source))?.min(vol.capacity_bytes)
        } else {
            0
        };
        // Nothing to make room for (a fence's link): no scan of the pool's records inside
        // the hand-off.
        if needed > 0 {
            self.ensure_room(needed).await?;
        }
        let rec = SnapshotRecord {
            id,
            name: name.to_string(),
            source_volume: source.clone(),
            size_bytes: vol.capacity_bytes,
            group: group.cloned(),
            state: RecordState::Creating,
            reserved_bytes: needed,
            created_unix_nanos: now_nanos(),
            shipping: false,
            kind: Some(vol.kind.clone()),
        };
        fsutil::write_json(&self.snapshot_meta(&rec.id), &rec)?;
        failpoint::hit("create-snapshot:after-record");
        Ok(Ok(rec))
    }

    /// Second step: the point-in-time copy. The image goes to tmp/ so a crash never leaves a
    /// half-copied file where a snapshot is expected.
    pub async fn copy_snapshot(&self, rec: &SnapshotRecord) -> Result<CopyMethod> {
        let tmp = self.tmp(&format!("{}.img", rec.id));
        fsutil::remove_file_durable(&tmp)?;
        let src = self.volume_image(&rec.source_volume);
        let reflink = self.reflink;
        tokio::task::spawn_blocking(move || fsutil::clone_file(&src, &tmp, reflink))
            .await
            .expect("snapshot task panicked")
    }

    /// Last step: publish the image and mark the record ready.
    pub fn finish_snapshot(&self, rec: SnapshotRecord) -> Result<SnapshotRecord> {
        failpoint::hit("create-snapshot:after-copy");
        fsutil::rename_durable(
            &self.tmp(&format!("{}.img", rec.id)),
            &self.snapshot_image(&rec.id),
        )?;
        let rec = SnapshotRecord {
            state: RecordState::Ready,
            // The snapshot's time is when its data was cut, not when it was requested.
            created_unix_nanos: now_nanos(),
            ..rec
        };
        fsutil::write_json(&self.snapshot_meta(&rec.id), &rec)?;
        Ok(rec)
    }

    /// Removes a snapshot; one that does not exist is success.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let Some(s) = self.snapshot(id)? else {
            return Ok(());
        };
        self.mark_snapshot_deleting(&s)?;
        failpoint::hit("delete-snapshot:after-mark");
        self.finish_delete_snapshot(id)
    }

    /// The first, durable step of a delete: from here the snapshot is gone for every reader,
    /// and a crash finishes the delete.
    fn mark_snapshot_deleting(&self, s: &SnapshotRecord) -> Result<()> {
        if s.state == RecordState::Deleting {
            return Ok(());
        }
        fsutil::write_json(
            &self.snapshot_meta(&s.id),
            &SnapshotRecord {
                state: RecordState::Deleting,
                ..s.clone()
            },
        )
    }

    fn finish_delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        fsutil::remove_file_durable(&self.tmp(&format!("{id}.img")))?;
        self.trash.put(&self.snapshot_image(id))?;
        fsutil::remove_file_durable(&self.snapshot_meta(id))
    }

    // ---- crash recovery ------------------------------------------------------------

    /// Finishes or undoes what a crash interrupted: half-created volumes and snapshots are
    /// discarded (never acknowledged, the CO retries them), half-deleted ones are finished,
    /// and tmp/ is emptied. Returns how many records it repaired.
    pub fn reconcile(&self) -> Result<usize> {
        let mut repaired = 0;
        for v in self.volumes()? {
            match v.state {
                RecordState::Ready => {
                    if self.roll_back_growth(&v)? {
                        repaired += 1;
                    }
                }
                RecordState::Creating | RecordState::Deleting => {
                    tracing::info!(volume.id = %v.id, state = ?v.state, "removing volume left half-done by a crash");
                    self.finish_delete_volume(&v.id)?;
                    repaired += 1;
                }
            }
        }
        for s in self.snapshots()? {
            if s.state != RecordState::Ready {
                tracing::info!(snapshot.id = %s.id, state = ?s.state, "removing snapshot left half-done by a crash");
                self.finish_delete_snapshot(&s.id)?;
                repaired += 1;
            }
        }
        for g in self.groups()? {
            if g.state != RecordState::Ready {
                self.delete_group(&g)?;
                repaired += 1;
            }
        }
        let tmp = self.dir.join("tmp");
        for e in fs::read_dir(&tmp)
            .map_err(Error::io("list", &tmp))?
            .flatten()
        {
            // Half-built images only; dot files are other processes' live probes.
            let p = e.path();
            if p.extension().is_some_and(|x| x == "img") {
                fsutil::remove_file_durable(&p)?;
            }
        }
        for sub in ["volumes", "snapshots", "groups", "replicas"] {
            fsutil::remove_stale_temps(&self.dir.join(sub))?;
        }
        self.tidy_incoming()?;
        Ok(repaired)
    }

    /// An expansion that crashed between growing the image and recording the new size was
    /// never acknowledged: the image is cut back to the recorded capacity. Left grown, a
    /// first stage would format (and a restage grow) a filesystem larger than the volume,
    /// which no longer fits into snapshots restored or clones made at the recorded size, and
    /// the volume would use more of the pool than it reserves. Only blocks past the recorded
    /// size go, which no device has shown: one attached at the larger size is left alone.
    fn roll_back_growth(&self, v: &VolumeRecord) -> Result<bool> {
        let image = self.volume_image(&v.id);
        let len = match fs::metadata(&image) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("stat", &image)(e)),
        };
        if len <= v.capacity_bytes {
            return Ok(false);
        }
        let shown_larger = loopdev::list_blocking()?
            .iter()
            .filter(|l| !l.deleted && l.backing_file == image)
            .any(|l| loopdev::size_bytes(&l.device).is_some_and(|b| b > v.capacity_bytes));
        if shown_larger {
            tracing::warn!(volume.id = %v.id, image_bytes = len, capacity = v.capacity_bytes, "volume image is larger than its record and attached at that size; leaving it");
            return Ok(false);
        }
        tracing::info!(volume.id = %v.id, image_bytes = len, capacity = v.capacity_bytes, "rolling back an expansion left half-done by a crash");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .map_err(Error::io("open", &image))?;
        f.set_len(v.capacity_bytes)
            .map_err(Error::io("truncate", &image))?;
        f.sync_all().map_err(Error::io("fsync", &image))?;
        Ok(true)
    }
}

/// A fenced volume's image is also its final shipping snapshot (`ship::Pool::fence`), so
/// nothing may change it until the hand-off completes or is cancelled.
fn refuse_fenced(v: &VolumeRecord) -> Result<()> {
    match &v.fence {
        Some(f) => Err(Error::FailedPrecondition(format!(
            "volume {} is handing off to node {}; retry once it lives there",
            v.id, f.to
        ))),
        None => Ok(()),
    }
}

/// Allocates the whole image when asked to (thick provisioning) and makes it durable.
fn finish_image(f: &File, path: &Path, len: u64, preallocate: bool) -> Result<()> {
    if preallocate && len > 0 {
        rustix::fs::fallocate(f, rustix::fs::FallocateFlags::KEEP_SIZE, 0, len)
            .map_err(|e| Error::io("fallocate", path)(e.into()))?;
    }
    f.sync_all().map_err(Error::io("fsync", path))
}

fn align_up(n: u64) -> Option<u64> {
    n.checked_add(ALIGN - 1).map(|x| x / ALIGN * ALIGN)
}

fn align_down(n: u64) -> u64 {
    n / ALIGN * ALIGN
}

/// Chooses a size from a CSI capacity range: at least `required` and `min`, rounded up to
/// [`ALIGN`], never above `limit` (0 = no limit). With neither bound, the default size.
pub fn size_for(required: u64, limit: u64, min: u64) -> Result<u64> {
    let want = if required == 0 && limit == 0 {
        DEFAULT_VOLUME_BYTES.max(min)
    } else if required == 0 {
        // Only a ceiling: the largest aligned size under it, but at least the minimum.
        align_down(limit).min(DEFAULT_VOLUME_BYTES).max(min)
    } else {
        required.max(min)
    };
    let size =
        align_up(want).ok_or_else(|| Error::OutOfRange(format!("{want} bytes is too large")))?;
    if limit != 0 && size > limit {
        return Err(Error::OutOfRange(format!(
            "needs {size} bytes (required {required}, minimum {min}, {ALIGN}-byte aligned) but limit_bytes is {limit}"
        )));
    }
    Ok(size)
}

fn compatible_volume(existing: VolumeRecord, req: &NewVolume) -> Result<VolumeRecord> {
    let mismatch = |detail: String| Error::AlreadyExists {
        kind: "volume",
        name: req.name.clone(),
        detail,
    };
    if existing.capacity_bytes < req.required_bytes
        || (req.limit_bytes != 0 && existing.capacity_bytes > req.limit_bytes)
    {
        return Err(mismatch(format!(
            "its size {} is outside the requested range",
            existing.capacity_bytes
        )));
    }
    if existing.kind != req.kind {
        return Err(mismatch(format!("it is {:?}", existing.kind)));
    }
    if existing.source != req.source {
        return Err(mismatch(format!(
            "its content source is {:?}",
            existing.source
        )));
    }
    if existing.replication != req.replication {
        return Err(mismatch(format!(
            "its replication is {:?}",
            existing.replication
        )));
    }
    if existing.settings != req.settings {
        return Err(mismatch(format!(
            "its settings are {:?}",
            existing.settings
        )));
    }
    Ok(existing)
}

/// Whether this filesystem can share extents, tried for real on a scratch file.
fn probe_reflink(dir: &Path) -> Result<bool> {
    let pid = std::process::id();
    let a = dir.join(format!(".reflink-probe-{pid}-a"));
    let b = dir.join(format!(".reflink-probe-{pid}-b"));
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    fs::write(&a, [0u8; 4096]).map_err(Error::io("write", &a))?;
    let ok = File::open(&a)
        .and_then(|s| File::create(&b).map(|d| (s, d)))
        .map(|(s, d)| rustix::fs::ioctl_ficlone(&d, &s).is_ok())
        .map_err(Error::io("probe reflink", &b))?;
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cancelled hand-off must not leave the target's room promised to a receive that can
    /// never be kept.
    #[tokio::test]
    async fn a_raised_floor_releases_the_receives_of_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path()).await.unwrap();
        let (vol, other) = (VolumeId::for_name("moved"), VolumeId::for_name("other"));
        for (v, snap) in [(&vol, "s1"), (&other, "s2")] {
            pool.reserve_incoming(&IncomingProgress {
                volume: v.clone(),
                snapshot: SnapshotId::for_name(snap),
                base: None,
                plan_digest: "plan".into(),
                next_offset: 0,
                chunks: 0,
                bytes_done: 0,
                reserved_bytes: 8 * MIB,
            })
            .await
            .unwrap();
        }
        assert_eq!(pool.incoming_reserved().unwrap(), 16 * MIB);
        pool.raise_epoch_floor(&vol, 5).unwrap();
        assert_eq!(
            pool.incoming_reserved().unwrap(),
            8 * MIB,
            "only the other volume's"
        );
    }

    #[test]
    fn sizes_follow_the_capacity_range() {
        let cases: &[(u64, u64, u64, Result<u64, ()>)] = &[
            // (required, limit, min) -> size
            (0, 0, MIB, Ok(GIB)),
            (1, 0, MIB, Ok(MIB)),
            (MIB + 1, 0, MIB, Ok(2 * MIB)),
            (10 * MIB, 10 * MIB, MIB, Ok(10 * MIB)),
            (0, 5 * GIB, MIB, Ok(GIB)),
            (0, 100 * MIB + 5, MIB, Ok(100 * MIB)),
            (MIB + 1, MIB + 2, MIB, Err(())),
            (100 * MIB, 0, 300 * MIB, Ok(300 * MIB)),
            (100 * MIB, 200 * MIB, 300 * MIB, Err(())),
            (u64::MAX, 0, MIB, Err(())),
        ];
        for &(req, lim, min, ref want) in cases {
            let got = size_for(req, lim, min).map_err(|_| ());
            assert_eq!(&got, want, "required={req} limit={lim} min={min}");
        }
    }
}
