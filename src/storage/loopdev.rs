//! Loop devices through util-linux `losetup`, which already handles the allocation race
//! between processes (LOOP_CTL_GET_FREE + retry) that a hand-rolled ioctl path would have to.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{error::Result, util::exec};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub device: PathBuf,
    pub backing_file: PathBuf,
    /// The backing file was unlinked while attached.
    pub deleted: bool,
}

#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    loopdevices: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    #[serde(rename = "back-file")]
    back_file: Option<String>,
}

pub async fn list() -> Result<Vec<LoopDevice>> {
    let out = exec::run("losetup", ["--list", "--json", "-O", "NAME,BACK-FILE"]).await?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let listing: Listing =
        serde_json::from_str(&out).map_err(|e| crate::error::Error::Corrupt {
            path: "losetup --json".into(),
            reason: e.to_string(),
        })?;
    Ok(listing
        .loopdevices
        .into_iter()
        .filter_map(|e| {
            let back = e.back_file?;
            let (file, deleted) = match back.strip_suffix(" (deleted)") {
                Some(f) => (f.to_string(), true),
                None => (back, false),
            };
            Some(LoopDevice {
                device: PathBuf::from(e.name),
                backing_file: PathBuf::from(file),
                deleted,
            })
        })
        .collect())
}

/// The live (not deleted) loop device backed by `image`, if any.
pub async fn find(image: &Path) -> Result<Option<PathBuf>> {
    Ok(list()
        .await?
        .into_iter()
        .find(|l| !l.deleted && l.backing_file == image)
        .map(|l| l.device))
}

/// Attaches `image` with direct I/O (no second page cache over the pool's), reusing an
/// existing attachment so a retried stage does not leak a device.
pub async fn attach(image: &Path, direct_io: bool) -> Result<PathBuf> {
    if let Some(dev) = find(image).await? {
        return Ok(dev);
    }
    let dio = if direct_io {
        "--direct-io=on"
    } else {
        "--direct-io=off"
    };
    let out = exec::run(
        "losetup",
        [
            "--find".as_ref(),
            "--show".as_ref(),
            dio.as_ref(),
            image.as_os_str(),
        ],
    )
    .await?;
    Ok(PathBuf::from(out.trim()))
}

pub async fn detach(device: &Path) -> Result<()> {
    match exec::run("losetup", ["-d".as_ref(), device.as_os_str()]).await {
        Ok(_) => Ok(()),
        // Already detached (or never existed): the goal state holds.
        Err(crate::error::Error::Command { stderr, .. })
            if stderr.contains("No such device") || stderr.contains("No such file") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Re-reads the backing file's size after it grew.
pub async fn refresh_capacity(device: &Path) -> Result<()> {
    exec::run("losetup", ["-c".as_ref(), device.as_os_str()]).await?;
    Ok(())
}
