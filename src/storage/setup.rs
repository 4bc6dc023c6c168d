//! Bringing a pool up: the embedded default (a sparse image in the state dir, formatted XFS
//! with reflink and loop-mounted), an admin-named block device, or an admin-named directory.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use super::{
    loopdev,
    mount::{self, Content},
};
use crate::{
    error::{Error, Result},
    util::{exec, fsutil},
};

#[derive(Debug, Clone)]
pub enum PoolSource {
    /// Sparse image `<state_dir>/pool.img` of this many bytes, created on first start.
    Image { size_bytes: u64 },
    /// A block device berth formats (only when blank) and mounts.
    Device(PathBuf),
    /// An existing directory on a filesystem the admin prepared.
    Directory(PathBuf),
}

/// Makes the pool's filesystem available and returns its root. Idempotent: a restart finds
/// the image's loop device and the mount already there and reuses them. Setup holds an
/// exclusive lock on `<state_dir>/pool.lock` so a controller and a node process sharing a
/// state dir never both format or attach.
pub async fn prepare(state_dir: &Path, source: &PoolSource) -> Result<PathBuf> {
    fs::create_dir_all(state_dir).map_err(Error::io("create", state_dir))?;
    let lock_path = state_dir.join("pool.lock");
    let lock_file = File::create(&lock_path).map_err(Error::io("create", &lock_path))?;
    let _lock =
        tokio::task::spawn_blocking(move || Flock::lock(lock_file, FlockArg::LockExclusive))
            .await
            .expect("lock task panicked")
            .map_err(|(_, e)| Error::io("lock", &lock_path)(e.into()))?;

    let mount_point = state_dir.join("pool");
    match source {
        PoolSource::Directory(dir) => {
            if !dir.is_dir() {
                return Err(Error::PoolUnavailable(format!(
                    "pool directory {} does not exist",
                    dir.display()
                )));
            }
            return Ok(dir.clone());
        }
        PoolSource::Image { size_bytes } => {
            let image = state_dir.join("pool.img");
            if !image.exists() {
                let f = File::create(&image).map_err(Error::io("create", &image))?;
                f.set_len(*size_bytes)
                    .map_err(Error::io("truncate", &image))?;
                f.sync_all().map_err(Error::io("fsync", &image))?;
                fsutil::sync_dir(state_dir)?;
            }
            warn_if_host_too_small(state_dir, &image, *size_bytes);
            if fsutil::is_mount_point(&mount_point)? {
                // A restart: the device may have been attached by an older berth, on a
                // number a volume had before, so it is tuned here too. Only found, never
                // attached: a second device on a mounted image would be a leak.
                if let Some(device) = loopdev::find(&image).await? {
                    loopdev::tune(&device, loopdev::Role::Pool);
                }
                // A pool an older berth mounted without discard gets it now.
                if let Err(e) = exec::run(
                    "mount",
                    [
                        "-o".as_ref(),
                        "remount,discard".as_ref(),
                        mount_point.as_os_str(),
                    ],
                )
                .await
                {
                    tracing::warn!(pool = %mount_point.display(), error = %e, "cannot remount the pool with discard: space it frees stays taken on the host");
                }
                return Ok(mount_point);
            }
            let device = loopdev::attach(&image, true).await?;
            loopdev::tune(&device, loopdev::Role::Pool);
            // An image is sparse on its host: discard makes every block the pool frees (a
            // deleted image, a volume's trim passed through) a hole in the image again, so
            // the space goes back to the host rather than staying allocated in the file.
            format_and_mount(&device, &mount_point, &["-o", "discard"]).await?;
        }
        PoolSource::Device(device) => {
            if fsutil::is_mount_point(&mount_point)? {
                return Ok(mount_point);
            }
            format_and_mount(device, &mount_point, &[]).await?;
        }
    }
    Ok(mount_point)
}

/// The embedded pool is a sparse file of its nominal size on a host filesystem that may
/// hold far less. Writes past what the host holds fail inside the pool's XFS, which then
/// shuts down and takes every volume on the node with it: say so at start.
fn warn_if_host_too_small(state_dir: &Path, image: &Path, size_bytes: u64) {
    let Ok(host) = fsutil::fs_stats(state_dir) else {
        return;
    };
    let held = fsutil::allocated_bytes(image).unwrap_or(0);
    let can_hold = host.available_bytes.saturating_add(held);
    if size_bytes > can_hold {
        tracing::warn!(
            image = %image.display(),
            pool_bytes = size_bytes,
            host_can_hold_bytes = can_hold,
            "the pool image is larger than its host filesystem can hold: if the host fills up, the pool's filesystem shuts down and every volume on this node fails; lower --pool-size or free space on the host"
        );
    }
}

async fn format_and_mount(device: &Path, mount_point: &Path, options: &[&str]) -> Result<()> {
    match mount::probe(device).await? {
        Content::Blank => {
            // reflink=1 gives O(1) snapshots and clones; it is the mkfs.xfs default on
            // current xfsprogs, but stated so an older default cannot silently remove it.
            exec::run(
                "mkfs.xfs",
                [
                    "-q".as_ref(),
                    "-K".as_ref(),
                    "-m".as_ref(),
                    "reflink=1".as_ref(),
                    device.as_os_str(),
                ],
            )
            .await?;
        }
        Content::Filesystem(_) => {}
        Content::Other(what) => {
            return Err(Error::PoolUnavailable(format!(
                "{} holds {what}; berth only formats blank devices",
                device.display()
            )));
        }
    }
    fs::create_dir_all(mount_point).map_err(Error::io("create", mount_point))?;
    let mut args: Vec<&std::ffi::OsStr> = options.iter().map(|o| o.as_ref()).collect();
    args.extend([device.as_os_str(), mount_point.as_os_str()]);
    exec::run("mount", args).await?;
    Ok(())
}
