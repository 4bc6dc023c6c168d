//! The changed-range planner (`berth::storage::delta`) on real files: XFS with reflink on a
//! loop device, as in a berth pool. Every plan is checked by applying it the way a receiver
//! would (copy of base, or an empty sparse file; write Data, punch Zero) and comparing the
//! result with the new image byte for byte; the shipped byte counts are then held to what
//! actually changed.
//!
//! Needs root, loop devices, mkfs.xfs and tmpfs; fails (never skips) without them.

use std::{
    fs::{self, File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use berth::{
    storage::delta::{self, BLOCK, Method, Piece, Plan},
    util::fsutil::{CopyMethod, clone_file},
};
use rustix::fs::FallocateFlags;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// mkfs below pins the block size, which is the granularity FIEMAP can see.
const FS_BLOCK: u64 = 4 * KIB;

// ---- fixture ---------------------------------------------------------------------------

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the delta tests mount XFS on a loop device and tmpfs: run them as root (CI does)"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A filesystem mounted on a temp dir, unmounted on drop even when the test panics. `mount
/// -o loop` sets autoclear, so the unmount also frees the loop device.
struct Mounted {
    mnt: PathBuf,
    // Dropped after `drop` has unmounted: removes the image and the mount point.
    _dir: tempfile::TempDir,
}

impl Mounted {
    /// A sparse 1 GiB XFS image with reflink, 4 KiB blocks.
    fn xfs() -> Mounted {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("berth-delta-")
            .tempdir()
            .unwrap();
        let img = dir.path().join("fs.img");
        File::create(&img).unwrap().set_len(GIB).unwrap();
        run(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1", "-b", "size=4096"])
            .arg(&img));
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        run(Command::new("mount")
            .args(["-t", "xfs", "-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        Mounted { mnt, _dir: dir }
    }

    /// tmpfs has no FIEMAP (EOPNOTSUPP), which the planner must survive.
    fn tmpfs() -> Mounted {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("berth-delta-")
            .tempdir()
            .unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512m", "berth-delta"])
            .arg(&mnt));
        Mounted { mnt, _dir: dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds it (a panic mid-write): detach it lazily rather than
            // leave a mount behind.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// xorshift64*: reproducible offsets and contents without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: u64) -> Vec<u8> {
        (0..len.div_ceil(8))
            .flat_map(|_| self.next().to_le_bytes())
            .take(len as usize)
            .collect()
    }
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Writes pseudo-random bytes, in 1 MiB pieces so large fills stay cheap on memory.
fn fill(f: &File, offset: u64, len: u64, rng: &mut Rng) {
    let mut at = offset;
    while at < offset + len {
        let n = MIB.min(offset + len - at);
        f.write_all_at(&rng.bytes(n), at).unwrap();
        at += n;
    }
}

fn fallocate(f: &File, mode: FallocateFlags, offset: u64, len: u64) {
    rustix::fs::fallocate(f, mode, offset, len)
        .unwrap_or_else(|e| panic!("fallocate {mode:?} {offset}+{len}: {e}"));
}

/// A point-in-time snapshot, as the pool takes them: FICLONE of the (fsynced) volume image.
fn snapshot(src: &Path, dst: &Path) {
    assert_eq!(
        clone_file(src, dst, true).unwrap(),
        CopyMethod::Reflink,
        "{} must be on a reflink filesystem",
        src.display()
    );
}

/// Bytes of the union of `ranges`, each widened to `gran` boundaries, clipped to `size`.
fn rounded_bytes(ranges: &[(u64, u64)], gran: u64, size: u64) -> u64 {
    let mut r: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(o, l)| (o / gran * gran, (o + l).next_multiple_of(gran).min(size)))
        .collect();
    r.sort_unstable();
    let (mut total, mut end) = (0, 0);
    for (s, e) in r {
        let s = s.max(end);
        if e > s {
            total += e - s;
            end = e;
        }
    }
    total
}

// ---- applying a plan -------------------------------------------------------------------

fn assert_well_formed(plan: &Plan, what: &str) {
    let mut prev: Option<Piece> = None;
    for p in &plan.pieces {
        assert!(!p.is_empty(), "{what}: empty piece {p:?}");
        assert!(
            p.end() <= plan.size,
            "{what}: {p:?} past size {}",
            plan.size
        );
        if let Some(q) = prev {
            assert!(
                q.end() <= p.offset(),
                "{what}: {q:?} then {p:?} out of order"
            );
            let same = matches!(
                (q, p),
                (Piece::Data { .. }, Piece::Data { .. }) | (Piece::Zero { .. }, Piece::Zero { .. })
            );
            assert!(
                !(same && q.end() == p.offset()),
                "{what}: {q:?} and {p:?} not merged"
            );
        }
        prev = Some(*p);
    }
}

/// Does what a receiver does and returns the file it ends up with.
fn apply(plan: &Plan, new: &Path, base: Option<&Path>, out: &Path) {
    let _ = fs::remove_file(out);
    match base {
        Some(b) => {
            fs::copy(b, out).unwrap();
        }
        None => {
            File::create(out).unwrap();
        }
    }
    let dst = open_rw(out);
    dst.set_len(plan.size).unwrap();
    let src = File::open(new).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for p in delta::chunks(&plan.pieces, MIB) {
        match p {
            Piece::Data { offset, len } => {
                let b = &mut buf[..len as usize];
                src.read_exact_at(b, offset).unwrap();
                dst.write_all_at(b, offset).unwrap();
            }
            Piece::Zero { offset, len } => fallocate(
                &dst,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            ),
        }
    }
}

fn assert_same(got: &Path, want: &Path, what: &str) {
    let (g, w) = (File::open(got).unwrap(), File::open(want).unwrap());
    let len = w.metadata().unwrap().len();
    assert_eq!(g.metadata().unwrap().len(), len, "{what}: size");
    let (mut a, mut b) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut at = 0;
    while at < len {
        let n = MIB.min(len - at) as usize;
        g.read_exact_at(&mut a[..n], at).unwrap();
        w.read_exact_at(&mut b[..n], at).unwrap();
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{what}: applied plan differs from the new image at byte {}",
                at + i as u64
            );
        }
        at += n as u64;
    }
}

fn timed_plan(new: &Path, base: Option<&Path>, trusted: bool) -> (Plan, Duration) {
    let t = Instant::now();
    let plan = delta::plan(new, base, trusted).unwrap();
    (plan, t.elapsed())
}

/// Drops the clean page cache of `paths` so a content comparison reads from the device.
fn evict(paths: &[&Path]) {
    for p in paths {
        let f = File::open(p).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }
}

// ---- scenarios -------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expect {
    data: u64,
    zero: u64,
}

struct Scenario {
    name: &'static str,
    base: PathBuf,
    new: PathBuf,
    /// What each method must ship, exactly: Extents sees changes per filesystem block,
    /// Checksum per BLOCK.
    extents: Expect,
    checksum: Expect,
}

/// A volume image evolving over time, snapshotted with FICLONE as the pool does.
struct Volume<'a> {
    fs: &'a Mounted,
    name: &'static str,
    file: File,
    path: PathBuf,
}

impl<'a> Volume<'a> {
    fn new(fs: &'a Mounted, name: &'static str, size: u64) -> Volume<'a> {
        let path = fs.path(&format!("{name}.img"));
        let file = open_rw(&path);
        file.set_len(size).unwrap();
        Volume {
            fs,
            name,
            file,
            path,
        }
    }

    fn snapshot(&self, tag: &str) -> PathBuf {
        self.file.sync_all().unwrap();
        let dst = self.fs.path(&format!("{}.{tag}", self.name));
        snapshot(&self.path, &dst);
        dst
    }
}

fn scenarios(fs: &Mounted) -> Vec<Scenario> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::new();

    // 1. A sparse image with a few written regions, against an empty base.
    {
        let size = 64 * MIB;
        let v = Volume::new(fs, "sparse", size);
        let base = v.snapshot("base");
        let writes = [
            (0, 4 * KIB),
            (5 * MIB, 300 * KIB),
            (40 * MIB + 4 * KIB, 2 * MIB),
        ];
        for &(o, l) in &writes {
            fill(&v.file, o, l, &mut rng);
        }
        out.push(Scenario {
            name: "sparse image with written regions",
            new: v.snapshot("new"),
            base,
            extents: Expect {
                data: rounded_bytes(&writes, FS_BLOCK, size),
                zero: 0,
            },
            checksum: Expect {
                data: rounded_bytes(&writes, BLOCK, size),
                zero: 0,
            },
        });
    }

    // 2. 100 random 4 KiB writes into a fully written 256 MiB image.
    {
        let size = 256 * MIB;
        let v = Volume::new(fs, "random", size);
        fill(&v.file, 0, size, &mut rng);
        let base = v.snapshot("base");
        let writes: Vec<(u64, u64)> = (0..100)
            .map(|_| (rng.below(size / FS_BLOCK) * FS_BLOCK, 4 * KIB))
            .collect();
        for &(o, l) in &writes {
            fill(&v.file, o, l, &mut rng);
        }
        let extents = Expect {
            data: rounded_bytes(&writes, FS_BLOCK, size),
            zero: 0,
        };
        // The bound the transfer was budgeted with; the exact figure above is far below it
        // because XFS remaps only the written blocks, whatever the CoW extent size hint.
        assert!(extents.data <= 100 * 64 * KIB);
        out.push(Scenario {
            name: "100 random 4 KiB writes in 256 MiB",
            new: v.snapshot("new"),
            base,
            extents,
            checksum: Expect {
                data: rounded_bytes(&writes, BLOCK, size),
                zero: 0,
            },
        });
    }

    // 2b. The same with a 16 MiB CoW extent size hint: speculative CoW preallocation is
    // bigger, but only the written blocks are remapped into the file, so FIEMAP (which reads
    // the data fork) still shows exactly those.
    {
        let size = 64 * MIB;
        let v = Volume::new(fs, "cowext", size);
        run(Command::new("xfs_io")
            .args(["-c", "cowextsize 16m"])
            .arg(&v.path));
        fill(&v.file, 0, size, &mut rng);
        let base = v.snapshot("base");
        let writes: Vec<(u64, u64)> = (0..100)
            .map(|_| (rng.below(size / FS_BLOCK) * FS_BLOCK, 4 * KIB))
            .collect();
        for &(o, l) in &writes {
            fill(&v.file, o, l, &mut rng);
        }
        out.push(Scenario {
            name: "100 random 4 KiB writes, cowextsize 16m",
            new: v.snapshot("new"),
            base,
            extents: Expect {
                data: rounded_bytes(&writes, FS_BLOCK, size),
                zero: 0,
            },
            checksum: Expect {
                data: rounded_bytes(&writes, BLOCK, size),
                zero: 0,
            },
        });
    }

    // 3. Zeroing in the new version: a punched hole and a zeroed range (an unwritten
    // extent on XFS) become Zero pieces; preallocating over a hole changes nothing that
    // reads; zero bytes written as data are data to FIEMAP but zeros to a comparison.
    // FICLONE does not share unwritten extents (the clone gets holes there), so the live
    // image is planned too, to meet FIEMAP_EXTENT_UNWRITTEN itself.
    {
        let size = 16 * MIB;
        let v = Volume::new(fs, "zeroed", size);
        fill(&v.file, 0, 12 * MIB, &mut rng);
        let base = v.snapshot("base");
        fallocate(
            &v.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            2 * MIB,
            MIB,
        );
        fallocate(&v.file, FallocateFlags::ZERO_RANGE, 8 * MIB, MIB);
        fallocate(&v.file, FallocateFlags::empty(), 13 * MIB, MIB);
        v.file
            .write_all_at(&vec![0; BLOCK as usize], 4 * MIB)
            .unwrap();
        let extents = Expect {
            data: BLOCK,
            zero: 2 * MIB,
        };
        let checksum = Expect {
            data: 0,
            zero: 2 * MIB + BLOCK,
        };
        out.push(Scenario {
            name: "punched hole, zero range, preallocation, written zeros",
            new: v.snapshot("new"),
            base: base.clone(),
            extents,
            checksum,
        });
        out.push(Scenario {
            name: "the same, live image with unwritten extents",
            new: v.path.clone(),
            base,
            extents,
            checksum,
        });
    }

    // 4. The volume grew (to a size that is not block-aligned) and was written near its
    // new end: the tail past base's end is planned as if base had holes there.
    {
        let size = 16 * MIB;
        let v = Volume::new(fs, "grown", size);
        fill(&v.file, 0, 4 * MIB, &mut rng);
        let base = v.snapshot("base");
        let new_size = 24 * MIB + 1000;
        v.file.set_len(new_size).unwrap();
        let writes = [(18 * MIB, MIB), (new_size - 10, 10)];
        for &(o, l) in &writes {
            fill(&v.file, o, l, &mut rng);
        }
        out.push(Scenario {
            name: "grown and written at the end",
            new: v.snapshot("new"),
            base,
            extents: Expect {
                data: rounded_bytes(&writes, FS_BLOCK, new_size),
                zero: 0,
            },
            checksum: Expect {
                data: rounded_bytes(&writes, BLOCK, new_size),
                zero: 0,
            },
        });
    }

    // 4b. Base longer than new, which volumes never do but the planner must not trip on.
    {
        let size = 24 * MIB;
        let v = Volume::new(fs, "shrunk", size);
        fill(&v.file, 0, size, &mut rng);
        let base = v.snapshot("base");
        let new_size = 16 * MIB;
        v.file.set_len(new_size).unwrap();
        let writes = [(MIB, 4 * KIB)];
        fill(&v.file, MIB, 4 * KIB, &mut rng);
        out.push(Scenario {
            name: "shrunk",
            new: v.snapshot("new"),
            base,
            extents: Expect {
                data: rounded_bytes(&writes, FS_BLOCK, new_size),
                zero: 0,
            },
            checksum: Expect {
                data: rounded_bytes(&writes, BLOCK, new_size),
                zero: 0,
            },
        });
    }

    // 6. Nothing changed between two snapshots.
    {
        let size = 32 * MIB;
        let v = Volume::new(fs, "same", size);
        fill(&v.file, 0, 8 * MIB, &mut rng);
        fill(&v.file, 20 * MIB, 3 * MIB, &mut rng);
        out.push(Scenario {
            name: "identical snapshots",
            base: v.snapshot("base"),
            new: v.snapshot("new"),
            extents: Expect { data: 0, zero: 0 },
            checksum: Expect { data: 0, zero: 0 },
        });
    }

    // 6b. Same bytes, different blocks (written again, not cloned): extents cannot tell,
    // so they ship every allocated byte; a comparison ships nothing. This is why extents are
    // only trusted between reflinks of one image. (copy_file_range would not do here: on
    // XFS it reflinks.)
    {
        let size = 32 * MIB;
        let v = Volume::new(fs, "copied", size);
        fill(&v.file, 0, 8 * MIB, &mut rng);
        let base = v.snapshot("base");
        let new = fs.path("copied.new");
        let n = open_rw(&new);
        n.set_len(size).unwrap();
        let mut buf = vec![0u8; 8 * MIB as usize];
        v.file.read_exact_at(&mut buf, 0).unwrap();
        n.write_all_at(&buf, 0).unwrap();
        n.sync_all().unwrap();
        out.push(Scenario {
            name: "identical contents, different blocks",
            base,
            new,
            extents: Expect {
                data: 8 * MIB,
                zero: 0,
            },
            checksum: Expect { data: 0, zero: 0 },
        });
    }

    out
}

/// Plans `s` with `trusted`, applies the plan to a copy of base and checks the result.
fn check(fs: &Mounted, s: &Scenario, trusted: bool) -> Plan {
    let want_method = if trusted {
        Method::Extents
    } else {
        Method::Checksum
    };
    let what = format!("{} / {want_method:?}", s.name);
    evict(&[&s.new, &s.base]);
    let (plan, took) = timed_plan(&s.new, Some(&s.base), trusted);
    assert_eq!(plan.method, want_method, "{what}");
    assert_eq!(plan.size, fs::metadata(&s.new).unwrap().len(), "{what}");
    assert_well_formed(&plan, &what);
    let out = fs.path("applied");
    apply(&plan, &s.new, Some(&s.base), &out);
    assert_same(&out, &s.new, &what);
    let expect = if trusted { s.extents } else { s.checksum };
    let got = Expect {
        data: plan.data_bytes(),
        zero: plan.zero_bytes(),
    };
    eprintln!(
        "{what}: {} pieces, {} data bytes, {} zero bytes, planned in {took:?}",
        plan.pieces.len(),
        got.data,
        got.zero
    );
    assert_eq!(got, expect, "{what}: shipped bytes");
    plan
}

#[test]
fn plans_reproduce_the_new_image_and_ship_only_changes() {
    let fs = Mounted::xfs();
    for s in scenarios(&fs) {
        // Full: from nothing, only what is allocated travels.
        let full = delta::plan(&s.new, None, true).unwrap();
        let what = format!("{} / Full", s.name);
        assert_eq!(full.method, Method::Full, "{what}");
        assert_well_formed(&full, &what);
        assert_eq!(full.zero_bytes(), 0, "{what}");
        let allocated = delta::allocated(&s.new).unwrap();
        assert_eq!(
            full.data_bytes(),
            allocated.iter().map(|r| r.1).sum::<u64>(),
            "{what}: ships exactly the allocated ranges"
        );
        let out = fs.path("applied");
        apply(&full, &s.new, None, &out);
        assert_same(&out, &s.new, &what);

        check(&fs, &s, true);
        check(&fs, &s, false);
    }
}

#[test]
fn full_plan_of_a_sparse_image_ships_allocated_bytes_not_size() {
    let fs = Mounted::xfs();
    let mut rng = Rng(7);
    let size = 256 * MIB;
    let v = Volume::new(&fs, "full", size);
    let writes = [
        (MIB, 64 * KIB),
        (100 * MIB, 3 * MIB),
        (size - 4 * KIB, 4 * KIB),
    ];
    for &(o, l) in &writes {
        fill(&v.file, o, l, &mut rng);
    }
    // Preallocated but never written: reads as zeros, so it is not allocated for shipping.
    fallocate(&v.file, FallocateFlags::empty(), 200 * MIB, 8 * MIB);
    assert_eq!(delta::allocated(&v.path).unwrap(), writes.to_vec());
    let snap = v.snapshot("snap");
    let plan = delta::plan(&snap, None, true).unwrap();
    assert_eq!(plan.method, Method::Full);
    assert_eq!(plan.size, size);
    let written: u64 = writes.iter().map(|w| w.1).sum();
    assert_eq!(plan.data_bytes(), written);
    assert_eq!(
        delta::allocated(&snap).unwrap(),
        writes.to_vec(),
        "allocated ranges are the written ones, merged"
    );
    let out = fs.path("applied");
    apply(&plan, &snap, None, &out);
    assert_same(&out, &snap, "full");
}

/// Without FIEMAP the planner falls back to comparing contents, even when told to trust
/// extents.
#[test]
fn no_fiemap_falls_back_to_checksum() {
    let fs = Mounted::tmpfs();
    let mut rng = Rng(11);
    let size = 8 * MIB;
    let base = fs.path("base");
    let f = open_rw(&base);
    f.set_len(size).unwrap();
    fill(&f, 0, 2 * MIB, &mut rng);
    let new = fs.path("new");
    fs::copy(&base, &new).unwrap();
    let g = open_rw(&new);
    fill(&g, MIB + 100, 10, &mut rng);
    fill(&g, 6 * MIB, 4 * KIB, &mut rng);
    fallocate(
        &g,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        0,
        BLOCK,
    );
    let plan = delta::plan(&new, Some(&base), true).unwrap();
    assert_eq!(plan.method, Method::Checksum);
    assert_well_formed(&plan, "tmpfs");
    assert_eq!(plan.data_bytes(), 2 * BLOCK);
    assert_eq!(plan.zero_bytes(), BLOCK);
    let out = fs.path("applied");
    apply(&plan, &new, Some(&base), &out);
    assert_same(&out, &new, "tmpfs");
}

/// Buffered writes not yet written back live in XFS's CoW fork while FIEMAP reports the data
/// fork: the planner must flush first or it would see the old shared block.
#[test]
fn unflushed_writes_are_seen() {
    let fs = Mounted::xfs();
    let mut rng = Rng(13);
    let v = Volume::new(&fs, "dirty", 16 * MIB);
    fill(&v.file, 0, 16 * MIB, &mut rng);
    let base = v.snapshot("base");
    // No fsync: the page is dirty in v's cache when planning starts.
    fill(&v.file, 3 * MIB, 4 * KIB, &mut rng);
    let plan = delta::plan(&v.path, Some(&base), true).unwrap();
    assert_eq!(plan.method, Method::Extents);
    assert_eq!(
        plan.pieces,
        vec![Piece::Data {
            offset: 3 * MIB,
            len: 4 * KIB
        }]
    );
}

#[test]
fn chunks_respect_max_and_preserve_order_and_coverage() {
    let pieces = [
        Piece::Data { offset: 0, len: 1 },
        Piece::Zero {
            offset: 1,
            len: 10 * MIB,
        },
        Piece::Data {
            offset: 10 * MIB + 1,
            len: 3 * MIB,
        },
        Piece::Data {
            offset: 20 * MIB,
            len: 2 * MIB + 5,
        },
        Piece::Zero {
            offset: 30 * MIB,
            len: 1,
        },
    ];
    for max in [1, 4 * KIB, MIB, 3 * MIB, 64 * MIB] {
        let got: Vec<Piece> = delta::chunks(&pieces, max).collect();
        assert_eq!(
            got,
            delta::chunks(&pieces, max).collect::<Vec<_>>(),
            "deterministic"
        );
        for c in &got {
            assert!(!c.is_empty(), "max {max}: empty chunk");
            if let Piece::Data { len, .. } = c {
                assert!(*len <= max, "max {max}: {c:?} too long");
            }
        }
        // Re-merging adjacent chunks of one kind gives back the pieces, in order.
        let mut merged: Vec<Piece> = Vec::new();
        for c in got {
            match (merged.last_mut(), c) {
                (Some(Piece::Data { offset, len }), Piece::Data { offset: o, len: l })
                    if *offset + *len == o =>
                {
                    *len += l
                }
                _ => merged.push(c),
            }
        }
        assert_eq!(merged, pieces, "max {max}");
    }
    assert!(
        delta::chunks(
            &[Piece::Zero {
                offset: 0,
                len: 5 * MIB
            }],
            MIB
        )
        .eq([Piece::Zero {
            offset: 0,
            len: 5 * MIB
        }]),
        "Zero pieces travel whole: they carry no bytes, and the receiver takes a Zero \
         chunk of any length within the image (cluster::a_trimmed_volume_replicates_and_moves)"
    );
}

/// Not a pass/fail bound but the figure to budget with: how long planning takes on a
/// large, mostly sparse image, for each method.
#[test]
fn plan_cost_on_a_4gib_sparse_image() {
    let fs = Mounted::xfs();
    let mut rng = Rng(17);
    let size = 4 * GIB;
    let v = Volume::new(&fs, "big", size);
    let mut random_writes = |v: &Volume, n| -> Vec<(u64, u64)> {
        (0..n)
            .map(|_| {
                let w = (rng.below(size / FS_BLOCK) * FS_BLOCK, 4 * KIB);
                fill(&v.file, w.0, w.1, &mut rng);
                w
            })
            .collect()
    };
    let before = random_writes(&v, 1000);
    let base = v.snapshot("base");
    let writes = random_writes(&v, 1000);
    let new = v.snapshot("new");
    let extents_in_new = Command::new("xfs_io")
        .args(["-c", "fiemap"])
        .arg(&new)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .count()
                .saturating_sub(1)
        })
        .unwrap_or(0);
    eprintln!(
        "4 GiB image, {} KiB allocated, {extents_in_new} extents and holes, {} random 4 KiB writes since base",
        delta::allocated(&new)
            .unwrap()
            .iter()
            .map(|r| r.1)
            .sum::<u64>()
            / KIB,
        writes.len()
    );
    for (name, b, trusted) in [
        ("Full", None, true),
        ("Extents", Some(base.as_path()), true),
        ("Checksum", Some(base.as_path()), false),
    ] {
        evict(&[&new, &base, &v.path]);
        let (plan, took) = timed_plan(&new, b, trusted);
        eprintln!(
            "  {name:8}: {took:>10.1?}, {} pieces, {} KiB data, {} KiB zero",
            plan.pieces.len(),
            plan.data_bytes() / KIB,
            plan.zero_bytes() / KIB
        );
        assert_well_formed(&plan, name);
        let want = match name {
            "Full" => rounded_bytes(&[before.clone(), writes.clone()].concat(), FS_BLOCK, size),
            "Extents" => rounded_bytes(&writes, FS_BLOCK, size),
            _ => rounded_bytes(&writes, BLOCK, size),
        };
        assert_eq!(plan.data_bytes(), want, "{name}");
    }
}
