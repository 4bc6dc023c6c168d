//! The node's half: attaching volume images as loop devices, formatting, staging and
//! publishing them, and undoing all of it — including after a crash.
//!
//! Node records live in `<state_dir>/node/<vol-id>.json`, outside the pool: they describe
//! this machine's mounts and devices, which do not travel with the data.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{
    loopdev,
    model::*,
    mount::{self, Content},
    pool::Pool,
};
use crate::{
    error::{Error, Result},
    util::{failpoint, fsutil},
};

/// How the CO wants to use a volume on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Usage {
    Block,
    Mount {
        /// Empty: whatever the volume was created as.
        fs_type: Option<FsType>,
        flags: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// The capability it was published with: a repeat at the same target with another one
    /// is "published but incompatible".
    pub usage: Usage,
    pub mode: String,
    pub readonly: bool,
    /// A read-only block publish gets a read-only loop device of its own: a read-only bind
    /// mount does not stop writes to a device node, the device itself must refuse them.
    #[serde(default)]
    pub device: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub volume_id: VolumeId,
    pub staging_path: PathBuf,
    pub device: Option<PathBuf>,
    pub usage: Usage,
    /// The CSI access mode it was staged with (a repeat with another is incompatible).
    #[serde(default)]
    pub mode: String,
    /// False until the device is attached and (for filesystems) mounted.
    pub complete: bool,
    #[serde(default)]
    pub published: BTreeMap<PathBuf, Publication>,
    /// Set while a group snapshot holds the filesystem frozen; a crash then must thaw it.
    #[serde(default)]
    pub frozen: bool,
}

/// Volume health as NodeGetVolumeStats reports it.
#[derive(Debug, Clone)]
pub struct VolumeStats {
    pub block: bool,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub inodes: Option<(u64, u64, u64)>,
    /// `Some(message)` when something is wrong with the volume.
    pub abnormal: Option<String>,
}

#[derive(Debug)]
pub struct NodeState {
    dir: PathBuf,
    pool: Arc<Pool>,
    direct_io: bool,
}

impl NodeState {
    pub fn open(state_dir: &Path, pool: Arc<Pool>, direct_io: bool) -> Result<NodeState> {
        let dir = state_dir.join("node");
        fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        Ok(NodeState {
            dir,
            pool,
            direct_io,
        })
    }

    fn record_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn record(&self, id: &VolumeId) -> Result<Option<StageRecord>> {
        fsutil::read_json(&self.record_path(id))
    }

    fn save(&self, r: &StageRecord) -> Result<()> {
        fsutil::write_json(&self.record_path(&r.volume_id), r)
    }

    pub fn records(&self) -> Result<Vec<StageRecord>> {
        fsutil::read_records(&self.dir)
    }

    // ---- stage ---------------------------------------------------------------------

    pub async fn stage(
        &self,
        id: &VolumeId,
        staging: &Path,
        usage: Usage,
        mode: &str,
    ) -> Result<()> {
        let vol = self.pool.ready_volume(id)?;
        // A fenced copy is handing off to another node: writes here would be lost there.
        if let Some(f) = &vol.fence {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is handing off to node {} and cannot be staged here",
                f.to
            )));
        }
        if vol.suspended {
            return Err(Error::Suspended(id.to_string()));
        }
        let fs_type = check_usage(&vol, &usage)?;
        if let Some(existing) = self.record(id)? {
            if existing.staging_path != staging {
                return Err(Error::AlreadyExists {
                    kind: "staged volume",
                    name: id.to_string(),
                    detail: format!("it is staged at {}", existing.staging_path.display()),
                });
            }
            if existing.usage != usage || existing.mode != mode {
                return Err(Error::AlreadyExists {
                    kind: "staged volume",
                    name: id.to_string(),
                    detail: format!("it is staged as {:?} {}", existing.usage, existing.mode),
                });
            }
            if existing.complete && self.stage_intact(&existing)? {
                return Ok(());
            }
        }
        let mut rec = StageRecord {
            volume_id: id.clone(),
            staging_path: staging.to_owned(),
            device: None,
            usage: usage.clone(),
            mode: mode.to_string(),
            complete: false,
            published: BTreeMap::new(),
            frozen: false,
        };
        self.save(&rec)?;

        let device = loopdev::attach(&self.pool.volume_image(id), self.direct_io).await?;
        loopdev::tune(&device, loopdev::Role::Volume);
        rec.device = Some(device.clone());
        self.save(&rec)?;
        failpoint::hit("node-stage:after-attach");

        if let (Some(fs_type), Usage::Mount { flags, .. }) = (fs_type, &usage) {
            let existing = match mount::probe(&device).await? {
                // Formatted only when blank: an existing filesystem is the user's data.
                Content::Blank => {
                    mount::mkfs(&device, fs_type).await?;
                    failpoint::hit("node-stage:after-mkfs");
                    false
                }
                Content::Filesystem(found) if found == fs_type.as_str() => true,
                Content::Filesystem(found) => {
                    return Err(Error::CapabilityMismatch {
                        volume: id.to_string(),
                        reason: format!(
                            "it holds a {found} filesystem, {} was requested",
                            fs_type.as_str()
                        ),
                    });
                }
                Content::Other(what) => {
                    return Err(Error::CapabilityMismatch {
                        volume: id.to_string(),
                        reason: format!("it holds {what}, not a filesystem"),
                    });
                }
            };
            fs::create_dir_all(staging).map_err(Error::io("create", staging))?;
            if !is_mounted_from(staging, &device)? {
                mount::mount_fs(&device, staging, fs_type, flags).await?;
            }
            if existing && !flags.iter().any(|f| f == "ro") {
                grow_to_device(&device, staging, fs_type, flags).await?;
            }
            failpoint::hit("node-stage:after-mount");
        }
        rec.complete = true;
        self.save(&rec)
    }

    /// The device of a complete stage. Stage records the device before it marks itself
    /// complete, so only a record damaged from outside lacks one.
    fn staged_device(&self, rec: &StageRecord) -> Result<PathBuf> {
        rec.device.clone().ok_or_else(|| Error::Corrupt {
            path: self.record_path(&rec.volume_id),
            reason: "a complete stage without a device".into(),
        })
    }

    /// A complete stage whose device and mount are still in place (they may not be after a
    /// reboot, when the CO stages again).
    fn stage_intact(&self, r: &StageRecord) -> Result<bool> {
        let Some(dev) = &r.device else {
            return Ok(false);
        };
        if !dev.exists() {
            return Ok(false);
        }
        match r.usage {
            Usage::Block => Ok(true),
            Usage::Mount { .. } => is_mounted_from(&r.staging_path, dev),
        }
    }

    /// Undoes a stage. Only the staging path berth recorded for the volume is ever
    /// unmounted: the record is written before anything is attached or mounted, so a stage
    /// without one left nothing behind, and a path the CO names that berth did not stage
    /// may be anyone's mount.
    pub async fn unstage(&self, id: &VolumeId, staging: &Path) -> Result<()> {
        let Some(r) = self.record(id)? else {
            if self.pool.volume(id)?.is_none() {
                // Spec table: NOT_FOUND when the volume does not exist.
                return Err(Error::VolumeNotFound(id.to_string()));
            }
            // Spec: "If the volume corresponding to the volume_id is not staged to the
            // staging_target_path, the Plugin MUST reply 0 OK."
            return Ok(());
        };
        if r.staging_path != staging {
            return Err(Error::invalid(
                "staging_target_path",
                format!(
                    "volume {id} is staged at {}, not {}",
                    r.staging_path.display(),
                    staging.display()
                ),
            ));
        }
        let live: Vec<_> = r
            .published
            .keys()
            .filter(|p| fsutil::is_mount_point(p).unwrap_or(false))
            .collect();
        if !live.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published at {live:?}"
            )));
        }
        mount::unmount_all(&r.staging_path)?;
        failpoint::hit("node-unstage:after-unmount");
        let image = self.pool.volume_image(id);
        let device = match r.device.clone() {
            Some(d) => Some(d),
            None => loopdev::find(&image).await?,
        };
        if let Some(dev) = device {
            detach_if_backed_by(&dev, &image).await?;
        }
        // Read-only devices of block publishes whose unpublish never came (a crash).
        for dev in r.published.values().filter_map(|p| p.device.as_ref()) {
            detach_if_backed_by(dev, &image).await?;
        }
        fsutil::remove_file_durable(&self.record_path(id))
    }

    // ---- publish -------------------------------------------------------------------

    pub async fn publish(
        &self,
        id: &VolumeId,
        staging: &Path,
        target: &Path,
        usage: &Usage,
        mode: &str,
        readonly: bool,
    ) -> Result<()> {
        self.pool.ready_volume(id)?;
        let Some(mut rec) = self.record(id)?.filter(|r| r.complete) else {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is not staged on this node; NodeStageVolume must succeed first"
            )));
        };
        if rec.staging_path != staging {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is staged at {}, not {}",
                rec.staging_path.display(),
                staging.display()
            )));
        }
        let block = matches!(usage, Usage::Block);
        if block != matches!(rec.usage, Usage::Block) {
            return Err(Error::CapabilityMismatch {
                volume: id.to_string(),
                reason: format!("it is staged as {:?}", rec.usage),
            });
        }
        let mut want = Publication {
            usage: usage.clone(),
            mode: mode.to_string(),
            readonly,
            device: None,
        };
        if let Some(have) = rec.published.get(target) {
            // The device is an implementation detail of a read-only block publish, not part
            // of what the CO asked for.
            let same = (&have.usage, have.mode.as_str(), have.readonly) == (usage, mode, readonly);
            if !same {
                return Err(Error::AlreadyExists {
                    kind: "published volume",
                    name: id.to_string(),
                    detail: format!("{} is already published with {have:?}", target.display()),
                });
            }
            if fsutil::is_mount_point(target)? {
                return Ok(());
            }
            want.device = have.device.clone();
        }
        rec.published.insert(target.to_owned(), want.clone());
        self.save(&rec)?;

        if !fsutil::is_mount_point(target)? {
            let source = if block {
                let dev = if readonly {
                    // Recorded before it exists, so a crash in between leaves an owner that
                    // unpublish or reconcile can find.
                    let image = self.pool.volume_image(id);
                    let live = loopdev::all_for(&image).await?;
                    match want
                        .device
                        .clone()
                        .filter(|d| live.iter().any(|l| &l.device == d && l.read_only))
                    {
                        Some(d) => d,
                        None => {
                            let d = loopdev::attach_new(&image, self.direct_io, true).await?;
                            loopdev::tune(&d, loopdev::Role::Volume);
                            want.device = Some(d.clone());
                            rec.published.insert(target.to_owned(), want);
                            self.save(&rec)?;
                            d
                        }
                    }
                } else {
                    self.staged_device(&rec)?
                };
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(Error::io("create", parent))?;
                }
                if !target.exists() {
                    fs::File::create(target).map_err(Error::io("create", target))?;
                }
                dev
            } else {
                fs::create_dir_all(target).map_err(Error::io("create", target))?;
                staging.to_owned()
            };
            mount::bind(&source, target, readonly)?;
        }
        failpoint::hit("node-publish:after-mount");
        Ok(())
    }

    /// Undoes a publish. Only a target berth recorded for the volume is unmounted and
    /// removed: publish records it before it creates or mounts anything, and keeps it until
    /// this has removed both, so a crash anywhere in between leaves it recorded. Any other
    /// path is not berth's to touch, whatever is there.
    pub async fn unpublish(&self, id: &VolumeId, target: &Path) -> Result<()> {
        let rec = self.record(id)?;
        let staged = rec.is_some();
        let Some(mut r) = rec.filter(|r| r.published.contains_key(target)) else {
            if !staged && self.pool.volume(id)?.is_none() {
                // Spec table: NOT_FOUND when the volume does not exist.
                return Err(Error::VolumeNotFound(id.to_string()));
            }
            // Not published there (never, or already undone): idempotent success.
            return Ok(());
        };
        mount::unmount_all(target)?;
        // symlink_metadata: a symlink put at the target is removed itself, never followed.
        match fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => fs::remove_dir(target).map_err(Error::io("remove", target))?,
            Ok(_) => fs::remove_file(target).map_err(Error::io("remove", target))?,
            Err(_) => {}
        }
        if let Some(p) = r.published.remove(target) {
            if let Some(dev) = &p.device {
                detach_if_backed_by(dev, &self.pool.volume_image(id)).await?;
            }
            self.save(&r)?;
        }
        Ok(())
    }

    // ---- expansion and stats -------------------------------------------------------

    /// Grows what the node sees: the loop device, then the filesystem, online.
    pub async fn expand(&self, id: &VolumeId, volume_path: &Path) -> Result<u64> {
        let vol = self.pool.ready_volume(id)?;
        let rec = self.record(id)?.filter(|r| r.complete).ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {id} is not staged on this node"))
        })?;
        if volume_path != rec.staging_path && !rec.published.contains_key(volume_path) {
            return Err(Error::VolumeNotFound(format!(
                "{id} at {}",
                volume_path.display()
            )));
        }
        let dev = self.staged_device(&rec)?;
        loopdev::refresh_capacity(&dev).await?;
        if let (VolumeKind::Filesystem { fs_type }, Usage::Mount { .. }) = (&vol.kind, &rec.usage) {
            mount::grow_fs(&dev, &rec.staging_path, *fs_type).await?;
        }
        Ok(vol.capacity_bytes)
    }

    pub async fn stats(&self, id: &VolumeId, volume_path: &Path) -> Result<VolumeStats> {
        let vol = self.pool.ready_volume(id)?;
        // A stage still in progress (its record is written first) is not a staged volume yet.
        let rec = self
            .record(id)?
            .filter(|r| r.complete)
            .ok_or_else(|| Error::VolumeNotFound(format!("{id} on this node")))?;
        if volume_path != rec.staging_path && !rec.published.contains_key(volume_path) {
            return Err(Error::VolumeNotFound(format!(
                "{id} at {}",
                volume_path.display()
            )));
        }
        let image = self.pool.volume_image(id);
        let mut abnormal = None;
        if !image.exists() {
            abnormal = Some(format!("backing image {} is missing", image.display()));
        } else if let Some(dev) = &rec.device {
            let attached = loopdev::list()
                .await?
                .into_iter()
                .any(|l| &l.device == dev && l.backing_file == image && !l.deleted);
            if !attached {
                abnormal = Some(format!(
                    "loop device {} no longer backs this volume",
                    dev.display()
                ));
            }
        }
        let block = matches!(rec.usage, Usage::Block);
        if block {
            return Ok(VolumeStats {
                block,
                total_bytes: vol.capacity_bytes,
                available_bytes: 0,
                used_bytes: 0,
                inodes: None,
                abnormal,
            });
        }
        if !fsutil::is_mount_point(volume_path)? {
            // Nothing of the volume's is there to measure: statvfs would report whatever
            // filesystem holds the path (if the path exists at all, e.g. mid-publish).
            return Ok(VolumeStats {
                block,
                total_bytes: 0,
                available_bytes: 0,
                used_bytes: 0,
                inodes: None,
                abnormal: abnormal
                    .or_else(|| Some(format!("{} is not mounted", volume_path.display()))),
            });
        }
        let st = fsutil::fs_stats(volume_path)?;
        Ok(VolumeStats {
            block,
            total_bytes: st.total_bytes,
            available_bytes: st.available_bytes,
            used_bytes: st.used_bytes,
            inodes: Some((st.total_inodes, st.free_inodes, st.used_inodes)),
            abnormal,
        })
    }

    // ---- freeze (group snapshots) ----------------------------------------------------

    pub async fn freeze(&self, id: &VolumeId) -> Result<bool> {
        let Some(mut rec) = self
            .record(id)?
            .filter(|r| r.complete && matches!(r.usage, Usage::Mount { .. }))
        else {
            return Ok(false);
        };
        // Recorded before freezing: a crash while frozen would otherwise leave the database
        // blocked on a frozen filesystem that nobody knows to thaw.
        let ours_already = rec.frozen;
        rec.frozen = true;
        self.save(&rec)?;
        if let Err(e) = mount::freeze(&rec.staging_path).await {
            // EBUSY: it was frozen before this call, by someone else (berth's own leftovers
            // are thawed before a cut starts), so it is not berth's to thaw. Any other
            // failure, a timeout included, may have come after the kernel froze it: the mark
            // stays, and the caller's thaw covers it. A mark that was there before this call
            // is berth's own leftover (a thaw that failed earlier): it stays, so a thaw
            // still finds it.
            if !ours_already
                && matches!(&e, Error::Command { stderr, .. } if stderr.contains("Device or resource busy"))
            {
                rec.frozen = false;
                self.save(&rec)?;
            }
            return Err(e);
        }
        Ok(true)
    }

    /// Thaws what [`NodeState::freeze`] may have frozen. Only a record marked `frozen` is
    /// thawed: freeze marks it before it calls fsfreeze, so this covers a freeze whose
    /// outcome is unknown (fsfreeze killed by its timeout after the kernel froze the
    /// filesystem), and never thaws a filesystem someone else froze.
    pub async fn thaw(&self, id: &VolumeId) -> Result<()> {
        if let Some(mut rec) = self.record(id)?.filter(|r| r.frozen) {
            mount::thaw(&rec.staging_path).await?;
            rec.frozen = false;
            self.save(&rec)?;
        }
        Ok(())
    }

    /// [`NodeState::thaw`] for where nothing can be awaited (a drop guard). The record
    /// keeps its `frozen` mark, which the next thaw or start-up clears: this may run
    /// after the volume's in-flight guard is released, when writing its record could race
    /// another request's.
    pub fn thaw_blocking(&self, id: &VolumeId) -> Result<()> {
        match self.record(id)?.filter(|r| r.frozen) {
            Some(rec) => mount::thaw_blocking(&rec.staging_path),
            None => Ok(()),
        }
    }

    /// Volumes whose records say a group snapshot froze them.
    pub fn frozen(&self) -> Result<Vec<VolumeId>> {
        Ok(self
            .records()?
            .into_iter()
            .filter(|r| r.frozen)
            .map(|r| r.volume_id)
            .collect())
    }

    // ---- crash recovery ------------------------------------------------------------

    /// Repairs what a crash left on this node: thaws filesystems left frozen, rolls back
    /// stages that never completed, and detaches loop devices of berth's pool that no stage
    /// owns. Complete stages are left alone: pods are using them.
    pub async fn reconcile(&self) -> Result<usize> {
        let mut repaired = 0;
        let mut owned = Vec::new();
        // Every record is tried even when one fails: a single bad staging path must not
        // leave the other volumes' filesystems frozen or keep the node from starting. Each
        // failure is logged; the CO's retries (or an operator) take it from there.
        fsutil::remove_stale_temps(&self.dir)?;
        for r in self.records()? {
            if r.frozen {
                tracing::warn!(volume.id = %r.volume_id, "thawing a filesystem left frozen by a crash");
                match self.thaw(&r.volume_id).await {
                    Ok(()) => repaired += 1,
                    Err(e) => {
                        tracing::error!(volume.id = %r.volume_id, error = %e, "could not thaw")
                    }
                }
            }
            if !r.complete {
                tracing::info!(volume.id = %r.volume_id, "rolling back a stage left half-done by a crash");
                match self.unstage(&r.volume_id, &r.staging_path).await {
                    Ok(()) => repaired += 1,
                    Err(e) => {
                        tracing::error!(volume.id = %r.volume_id, error = %e, "could not roll back the stage")
                    }
                }
            } else {
                owned.extend(r.device.iter().cloned());
                owned.extend(r.published.values().filter_map(|p| p.device.clone()));
            }
        }
        // A volume image deleted while a crash left it attached sits in the trash, where
        // the loop device keeps its space until detached.
        let dirs = [self.pool.volumes_dir(), self.pool.trash_dir()];
        let mounts = fsutil::mounts()?;
        for l in loopdev::list().await? {
            let in_pool = l
                .backing_file
                .parent()
                .is_some_and(|p| dirs.iter().any(|d| d == p));
            if !in_pool {
                continue;
            }
            if owned.contains(&l.device) {
                // A stage from before berth tuned its devices keeps working untuned
                // otherwise, until it is unstaged.
                loopdev::tune(&l.device, loopdev::Role::Volume);
                continue;
            }
            let dev = l.device.to_string_lossy();
            if mounts.iter().any(|m| m.source == dev) {
                tracing::warn!(device = %dev, "unowned berth loop device is mounted; leaving it");
                continue;
            }
            tracing::info!(device = %dev, backing = %l.backing_file.display(), "detaching loop device no stage owns");
            match loopdev::detach(&l.device).await {
                Ok(()) => repaired += 1,
                Err(e) => tracing::error!(device = %dev, error = %e, "could not detach"),
            }
        }
        Ok(repaired)
    }
}

/// Checks a usage against what the volume is; returns the filesystem to mount, if any.
fn check_usage(vol: &VolumeRecord, usage: &Usage) -> Result<Option<FsType>> {
    let mismatch = |reason: String| Error::CapabilityMismatch {
        volume: vol.id.to_string(),
        reason,
    };
    match (&vol.kind, usage) {
        (VolumeKind::Block, Usage::Block) => Ok(None),
        (VolumeKind::Filesystem { fs_type }, Usage::Mount { fs_type: want, .. }) => match want {
            Some(w) if w != fs_type => Err(mismatch(format!(
                "it is formatted {}, {} was requested",
                fs_type.as_str(),
                w.as_str()
            ))),
            _ => Ok(Some(*fs_type)),
        },
        (VolumeKind::Block, Usage::Mount { .. }) => {
            Err(mismatch("it is a raw block volume".into()))
        }
        (VolumeKind::Filesystem { .. }, Usage::Block) => {
            Err(mismatch("it is a filesystem volume".into()))
        }
    }
}

/// A volume restored or cloned into a larger size holds a filesystem as large as its source:
/// it is grown to the device at stage, since no NodeExpandVolume will follow. Online first (a
/// no-op when it already fits); an online ext4 resize needs CAP_SYS_RESOURCE, and where that
/// is refused the filesystem is grown offline, which is safe because nothing uses it before
/// stage returns. It was mounted once already, so its journal is replayed and it is clean.
async fn grow_to_device(
    device: &Path,
    staging: &Path,
    fs_type: FsType,
    flags: &[String],
) -> Result<()> {
    match mount::grow_fs(device, staging, fs_type).await {
        Err(e) if fs_type == FsType::Ext4 => {
            tracing::info!(error = %e, device = %device.display(), "online grow refused; growing offline before first use");
            mount::unmount_all(staging)?;
            mount::grow_ext4_offline(device).await?;
            mount::mount_fs(device, staging, fs_type, flags).await
        }
        other => other,
    }
}

/// Detaches `dev` only while it is still backed by `image`: after a crash its number may
/// have been reused for someone else's file.
async fn detach_if_backed_by(dev: &Path, image: &Path) -> Result<()> {
    // Deleted backing files count: an image removed behind berth's back still pins its
    // device until it is detached.
    let ours = loopdev::list()
        .await?
        .iter()
        .any(|l| l.device == dev && l.backing_file == image);
    if ours {
        loopdev::detach(dev).await?;
    }
    Ok(())
}

fn is_mounted_from(path: &Path, device: &Path) -> Result<bool> {
    let dev = device.to_string_lossy();
    Ok(fsutil::mounts()?
        .iter()
        .any(|m| m.mount_point == path && m.source == dev))
}
