//! Filesystem primitives with the durability and sparseness guarantees berth relies on.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` so that after a crash the file holds either the old content or
/// the new, never a mix: temp file in the same directory, fsync, rename, fsync directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("metadata paths always have a parent");
    let tmp = dir.join(format!(
        ".{}.{}{TEMP_SUFFIX}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        unique_suffix()
    ));
    let mut f = File::create(&tmp).map_err(Error::io("create", &tmp))?;
    f.write_all(bytes).map_err(Error::io("write", &tmp))?;
    f.sync_all().map_err(Error::io("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(Error::io("rename", path))?;
    sync_dir(dir)
}

/// Temp files of [`write_atomic`] are `.<name>.<unique>.tmp` beside their target.
const TEMP_SUFFIX: &str = ".tmp";

/// `<pid>-<n>`: different for every call on this host, so two writers of one record (two
/// processes sharing a pool, or two requests in one) never write or rename each other's
/// temp file. With one fixed name, the second rename finds the file already gone.
pub fn unique_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the temp files a crash inside [`write_atomic`] left in `dir`; the records
/// themselves are whole (old or new). Call only while nothing else writes records there.
pub fn remove_stale_temps(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(Error::io("list", dir))?.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
            remove_file_durable(&e.path())?;
        }
    }
    Ok(())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).expect("metadata types always serialize");
    write_atomic(path, &bytes)
}

#[cfg(test)]
thread_local! {
    /// Records read on this thread: tests bound what an operation costs in reads with it.
    pub static RECORD_READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Reads a JSON record; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    #[cfg(test)]
    RECORD_READS.with(|n| n.set(n.get() + 1));
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path)(e)),
    }
}

/// Every `*.json` record in `dir`, in file-name order. Records are written atomically, so an
/// unreadable one is damage from outside (a disk error, a hand edit): it is logged and
/// skipped, left in place for an operator, so one bad record cannot take every other volume
/// down with it. Reading it by name still fails, with its path in the error.
pub fn read_records<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>> {
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(Error::io("list", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for p in names {
        match read_json(&p) {
            Ok(Some(r)) => out.push(r),
            // Deleted between listing and reading: simply not listed.
            Ok(None) => {}
            Err(e @ Error::Corrupt { .. }) => {
                tracing::error!(error = %e, "skipping unreadable record")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("fsync directory", dir))
}

/// Removes a file, durably; a file that is already gone is success.
pub fn remove_file_durable(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path.parent().expect("pool files have a parent")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path)(e)),
    }
}

pub fn rename_durable(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(Error::io("rename", from))?;
    sync_dir(to.parent().expect("pool files have a parent"))
}

/// How a copy of an image was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Shared extents (FICLONE): O(extents), no data moved.
    Reflink,
    /// Data ranges copied with copy_file_range, holes preserved.
    SparseCopy,
}

/// Makes `dst` a copy of `src` (created fresh, fsynced). Tries a reflink first; on a
/// filesystem without reflink support it copies only the allocated ranges so a sparse
/// image stays sparse.
pub fn clone_file(src: &Path, dst: &Path, allow_reflink: bool) -> Result<CopyMethod> {
    let s = File::open(src).map_err(Error::io("open", src))?;
    let d = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(Error::io("create", dst))?;
    let method = if allow_reflink && rustix::fs::ioctl_ficlone(&d, &s).is_ok() {
        CopyMethod::Reflink
    } else {
        sparse_copy(&s, &d, src, dst)?;
        CopyMethod::SparseCopy
    };
    d.sync_all().map_err(Error::io("fsync", dst))?;
    Ok(method)
}

fn sparse_copy(s: &File, d: &File, src: &Path, dst: &Path) -> Result<()> {
    use rustix::fs::SeekFrom;
    let len = s.metadata().map_err(Error::io("stat", src))?.len();
    d.set_len(len).map_err(Error::io("truncate", dst))?;
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(s, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(rustix::io::Errno::NXIO) => break, // no data after pos
            Err(e) => return Err(Error::io("seek data", src)(e.into())),
        };
        let hole = rustix::fs::seek(s, SeekFrom::Hole(data))
            .map_err(|e| Error::io("seek hole", src)(e.into()))?;
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let chunk = ((hole - off_in) as usize).min(1 << 30);
            let n = rustix::fs::copy_file_range(
                s.as_fd(),
                Some(&mut off_in),
                d.as_fd(),
                Some(&mut off_out),
                chunk,
            )
            .map_err(|e| Error::io("copy_file_range", dst)(e.into()))?;
            if n == 0 {
                break;
            }
        }
        pos = hole;
    }
    Ok(())
}

/// Bytes actually allocated to a file (st_blocks), which for a sparse image is what it
/// really costs the pool.
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .map_err(Error::io("stat", path))
}

#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub fn fs_stats(path: &Path) -> Result<FsStats> {
    let st = rustix::fs::statvfs(path).map_err(|e| Error::io("statvfs", path)(e.into()))?;
    let frsize = st.f_frsize;
    Ok(FsStats {
        total_bytes: st.f_blocks * frsize,
        available_bytes: st.f_bavail * frsize,
        used_bytes: (st.f_blocks - st.f_bfree) * frsize,
        total_inodes: st.f_files,
        free_inodes: st.f_ffree,
        used_inodes: st.f_files.saturating_sub(st.f_ffree),
    })
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The path mounted from inside the source filesystem ("/" for a whole device).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub options: String,
}

pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(Error::io("read", "/proc/self/mountinfo"))?;
    Ok(parse_mountinfo(&text))
}

/// Parses mountinfo(5): `id parent maj:min root mount_point options [optional…] - fstype source super_options`.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let mut post = post.split(' ');
            Some(MountEntry {
                root: PathBuf::from(unescape(pre.get(3)?)),
                mount_point: PathBuf::from(unescape(pre.get(4)?)),
                options: pre.get(5)?.to_string(),
                fs_type: post.next()?.to_string(),
                source: unescape(post.next().unwrap_or("")),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(mounts()?.iter().any(|m| m.mount_point == path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 25 7:3 / /var/lib/berth/pool rw,relatime shared:2 - xfs /dev/loop3 rw\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].root, PathBuf::from("/mnt1"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].options, "rw,relatime");
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn concurrent_atomic_writes_of_one_record_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.json");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..200 {
                        write_atomic(p, &[t; 64]).expect("a concurrent write must not fail");
                    }
                });
            }
        });
        let bytes = fs::read(&p).unwrap();
        assert!(
            bytes.len() == 64 && bytes.iter().all(|b| *b == bytes[0]),
            "one whole write"
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[7u8; 4096], 10 << 20).unwrap();
        f.sync_all().unwrap();
        let dst = dir.path().join("dst");
        clone_file(&src, &dst, false).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        assert!(
            allocated_bytes(&dst).unwrap() < 4 << 20,
            "copy stayed sparse"
        );
    }
}
