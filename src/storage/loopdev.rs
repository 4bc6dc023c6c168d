//! Loop devices: attached, detached and resized through util-linux `losetup`, which already
//! handles the allocation race between processes (LOOP_CTL_GET_FREE + retry) that a
//! hand-rolled ioctl path would have to; listed straight from sysfs.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{error::Result, util::exec};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub device: PathBuf,
    pub backing_file: PathBuf,
    /// The backing file was unlinked while attached.
    pub deleted: bool,
    pub read_only: bool,
    /// Cut down to one sector by [`set_fenced`]: every read and write past it fails.
    pub fenced: bool,
}

/// Every attached loop device, read from sysfs: `/sys/block/loopN/loop/` exists only while
/// the device has a backing file. The same facts `losetup --list` prints, without a process
/// per call (stage, unstage, delete and expand each look more than once).
pub async fn list() -> Result<Vec<LoopDevice>> {
    tokio::task::spawn_blocking(list_blocking)
        .await
        .expect("sysfs scan panicked")
}

/// [`list`] for callers outside the runtime (start-up repair).
pub fn list_blocking() -> Result<Vec<LoopDevice>> {
    let sys = Path::new("/sys/block");
    let entries = std::fs::read_dir(sys).map_err(crate::error::Error::io("list", sys))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        // Detached (or detaching) between the listing and the read: not attached.
        let Ok(back) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let back = back.trim_end_matches('\n');
        let (file, deleted) = match back.strip_suffix(" (deleted)") {
            Some(f) => (f, true),
            None => (back, false),
        };
        let read_only = std::fs::read_to_string(e.path().join("ro")).is_ok_and(|r| r.trim() == "1");
        // berth never sets a size limit except to fence.
        let fenced =
            std::fs::read_to_string(e.path().join("loop/sizelimit")).is_ok_and(|l| l.trim() != "0");
        out.push(LoopDevice {
            device: Path::new("/dev").join(&name),
            backing_file: PathBuf::from(file),
            deleted,
            read_only,
            fenced,
        });
    }
    Ok(out)
}

/// The live, writable loop device backed by `image`: the one a stage attached.
pub async fn find(image: &Path) -> Result<Option<PathBuf>> {
    Ok(all_for(image)
        .await?
        .into_iter()
        .find(|l| !l.read_only)
        .map(|l| l.device))
}

/// Every live loop device backed by `image` (the stage's, and read-only ones of read-only
/// block publishes).
pub async fn all_for(image: &Path) -> Result<Vec<LoopDevice>> {
    Ok(list()
        .await?
        .into_iter()
        .filter(|l| !l.deleted && l.backing_file == image)
        .collect())
}

/// Attaches `image` with direct I/O (no second page cache over the pool's), reusing an
/// existing writable attachment so a retried stage does not leak a device.
pub async fn attach(image: &Path, direct_io: bool) -> Result<PathBuf> {
    if let Some(dev) = find(image).await? {
        return Ok(dev);
    }
    attach_new(image, direct_io, false).await
}

/// Attaches `image` as a new device. Sectors are always 4 KiB: a direct-I/O loop device
/// otherwise takes the pool's I/O alignment for the file, which XFS reports as 512 bytes
/// until the image first shares extents (a snapshot or clone) and 4 KiB after, so the
/// device's geometry would change under a database doing 512-byte direct I/O.
pub async fn attach_new(image: &Path, direct_io: bool, read_only: bool) -> Result<PathBuf> {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--find".as_ref(),
        "--show".as_ref(),
        "--sector-size".as_ref(),
        "4096".as_ref(),
        if direct_io {
            "--direct-io=on"
        } else {
            "--direct-io=off"
        }
        .as_ref(),
    ];
    if read_only {
        args.push("--read-only".as_ref());
    }
    args.push(image.as_os_str());
    let out = exec::run("losetup", args).await?;
    Ok(PathBuf::from(out.trim()))
}

/// What a loop device is for; it decides where the device's requests complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The embedded pool's own device: `rq_affinity` 1, the kernel's default.
    Pool,
    /// A volume's device: `rq_affinity` 2, each request completes on the CPU that submitted
    /// it.
    Volume,
}

/// Sets the device's `rq_affinity` for its role. Measured with the embedded pool (an image
/// on a loop device; docs/BENCHMARKS.md, "Session 4"): on one ext4 volume with 4 KiB
/// sectors, as berth attaches it, alternating the setting took 4 KiB random writes at QD32
/// from 0.88x to 0.97x of a file on the pool (medians of 10 rounds); reads did not change.
/// In a run with 512-byte sectors, 2 on the pool's device as well undid the gain, so the
/// pool is set to 1, the kernel's default: the kernel keeps the setting across detach and
/// reattach, and a device number a volume used can come back as the pool's. Pools on a
/// device or directory were not measured; volumes get 2 there too. Best effort: the device
/// works either way.
pub fn tune(device: &Path, role: Role) {
    let Some(name) = device.file_name() else {
        return;
    };
    let value = match role {
        Role::Pool => "1",
        Role::Volume => "2",
    };
    let knob = Path::new("/sys/block").join(name).join("queue/rq_affinity");
    if let Err(e) = std::fs::write(&knob, value) {
        tracing::warn!(device = %device.display(), error = %e, "could not set rq_affinity; random I/O may be slower");
    }
}

/// How long [`detach`] waits for a device that was still open elsewhere to let go.
const DETACH_WAIT: Duration = Duration::from_secs(10);

pub async fn detach(device: &Path) -> Result<()> {
    let sysfs = device
        .file_name()
        .map(|n| Path::new("/sys/block").join(n).join("loop/backing_file"));
    let backing = sysfs
        .as_deref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    match exec::run("losetup", ["-d".as_ref(), device.as_os_str()]).await {
        Ok(_) => {}
        // Already detached (or never existed): the goal state holds.
        Err(crate::error::Error::Command { stderr, .. })
            if stderr.contains("No such device") || stderr.contains("No such file") =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    // LOOP_CLR_FD on a device that something else still has open (udev's blkid probing it
    // after the unmount, the last reference to its filesystem being dropped elsewhere) does
    // not detach it: it only sets autoclear, and the kernel detaches it when that opener
    // closes. Wait for that, so that "detached" means detached (a delete right after an
    // unstage would otherwise find the image still attached).
    let (Some(sysfs), Some(backing)) = (sysfs, backing) else {
        return Ok(());
    };
    let started = Instant::now();
    let deadline = started + DETACH_WAIT;
    let mut waited = false;
    // Gone, or the number already reused for another file: either way no longer ours.
    while std::fs::read_to_string(&sysfs).is_ok_and(|b| b == backing) {
        if !waited {
            waited = true;
            tracing::debug!(device = %device.display(), "loop device still open elsewhere; waiting for its autoclear");
        }
        if Instant::now() >= deadline {
            return Err(crate::error::Error::Timeout {
                command: format!(
                    "losetup -d {} (device still open elsewhere)",
                    device.display()
                ),
                timeout: DETACH_WAIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if waited {
        tracing::info!(device = %device.display(), waited_ms = started.elapsed().as_millis() as u64, "loop device detached after its last opener closed it");
    }
    Ok(())
}

/// The size the device currently shows, from sysfs (512-byte units there, whatever the
/// device's sector size).
pub fn size_bytes(device: &Path) -> Option<u64> {
    let name = device.file_name()?;
    let sectors = std::fs::read_to_string(Path::new("/sys/block").join(name).join("size")).ok()?;
    sectors.trim().parse::<u64>().ok().map(|s| s * 512)
}

/// Re-reads the backing file's size after it grew.
pub async fn refresh_capacity(device: &Path) -> Result<()> {
    exec::run("losetup", ["-c".as_ref(), device.as_os_str()]).await?;
    Ok(())
}

/// The size a fenced device keeps: one 4 KiB sector, so that the device stays attached and
/// a filesystem on it fails every I/O instead of seeing the device vanish.
const FENCED_SIZE: u64 = 4096;

/// Fences a live loop device (`on`) or lifts its fence, in place, under whatever is
/// mounted on it: a size limit of one sector makes every later read and write fail, so
/// the filesystem above gets I/O errors and a database on it stops. Measured on 6.18: the
/// read-only flag (`blockdev --setro`) does not stop writes through a mounted filesystem,
/// and neither does an immutable backing file; the size limit does, and is reversible.
pub fn set_fenced(device: &Path, on: bool) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(device)
        .map_err(crate::error::Error::io("open", device))?;
    let mut info =
        ioctl::get_status(&f).map_err(crate::error::Error::io("LOOP_GET_STATUS64", device))?;
    info.lo_sizelimit = if on { FENCED_SIZE } else { 0 };
    ioctl::set_status(&f, &info).map_err(crate::error::Error::io("LOOP_SET_STATUS64", device))
}

/// The two loop ioctls `losetup` has no command for on a bound device.
#[allow(unsafe_code)]
mod ioctl {
    use std::{fs::File, io, os::fd::AsRawFd};

    const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
    const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

    /// `struct loop_info64` from linux/loop.h (232 bytes).
    #[repr(C)]
    pub struct LoopInfo64 {
        pub lo_device: u64,
        pub lo_inode: u64,
        pub lo_rdevice: u64,
        pub lo_offset: u64,
        pub lo_sizelimit: u64,
        pub lo_number: u32,
        pub lo_encrypt_type: u32,
        pub lo_encrypt_key_size: u32,
        pub lo_flags: u32,
        pub lo_file_name: [u8; 64],
        pub lo_crypt_name: [u8; 64],
        pub lo_encrypt_key: [u8; 32],
        pub lo_init: [u64; 2],
    }

    pub fn get_status(f: &File) -> io::Result<LoopInfo64> {
        // SAFETY: all-zero bytes are a valid LoopInfo64 (integers and byte arrays only).
        let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
        // SAFETY: LOOP_GET_STATUS64 writes one loop_info64, which `info` is, and keeps no
        // pointer to it.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64, &mut info) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(info)
    }

    pub fn set_status(f: &File, info: &LoopInfo64) -> io::Result<()> {
        // SAFETY: LOOP_SET_STATUS64 reads one loop_info64, which `info` is.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_STATUS64, info) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
}
