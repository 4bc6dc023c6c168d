//! Plans what to ship so that a node holding an older snapshot image ends up with a newer one.
//!
//! On a reflink pool every snapshot is a FICLONE of its volume, so two snapshots of the same
//! volume share every block that was not written in between. Comparing their FIEMAP physical
//! mappings finds the changed ranges without reading a byte of data, at a cost proportional
//! to the number of extents rather than to the image size. Where that shortcut is unsound (no
//! reflink, no FIEMAP, different filesystems, extents whose address means nothing) the planner
//! compares contents instead.

use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::Path,
};

use fiemap::{Fiemap, FiemapExtentFlags, FiemapFlags};
use rustix::fs::SeekFrom;

use crate::error::{Error, Result};

/// Granularity of content comparison: large enough that a read is one cheap sequential I/O,
/// small enough that a 4 KiB change does not ship much more than itself.
pub const BLOCK: u64 = 64 << 10;

/// A byte range of the new image and what the receiver must do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Copy these bytes from the new image.
    Data { offset: u64, len: u64 },
    /// The range reads as zeros in the new image (hole or unwritten extent): the receiver punches a hole.
    Zero { offset: u64, len: u64 },
}

impl Piece {
    pub fn offset(&self) -> u64 {
        match *self {
            Piece::Data { offset, .. } | Piece::Zero { offset, .. } => offset,
        }
    }

    pub fn len(&self) -> u64 {
        match *self {
            Piece::Data { len, .. } | Piece::Zero { len, .. } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn end(&self) -> u64 {
        self.offset() + self.len()
    }

    /// The same kind of piece over another range.
    fn with_range(self, offset: u64, len: u64) -> Piece {
        match self {
            Piece::Data { .. } => Piece::Data { offset, len },
            Piece::Zero { .. } => Piece::Zero { offset, len },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Full,
    Extents,
    Checksum,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub size: u64,
    pub method: Method,
    pub pieces: Vec<Piece>,
}

impl Plan {
    /// Bytes that travel: the sum of the Data pieces.
    pub fn data_bytes(&self) -> u64 {
        self.pieces
            .iter()
            .filter(|p| matches!(p, Piece::Data { .. }))
            .map(Piece::len)
            .sum()
    }

    /// Bytes the receiver turns into holes; nothing travels for them.
    pub fn zero_bytes(&self) -> u64 {
        self.pieces
            .iter()
            .filter(|p| matches!(p, Piece::Zero { .. }))
            .map(Piece::len)
            .sum()
    }
}

/// What to ship so that a receiver holding `base` (byte-identical to the sender's `base`) ends up with `new`.
///
/// - `base` None: [`Method::Full`], Data pieces for the allocated ranges of `new` only; the
///   receiver starts from an empty sparse file of `size`.
/// - `base` Some and `extents_trusted` (a reflink pool): [`Method::Extents`], comparing the
///   two files' FIEMAP physical mappings. Ranges whose mapping carries no usable address are
///   confirmed by content. Falls back to Checksum when FIEMAP is unsupported or the files are
///   on different filesystems.
/// - `base` Some, not trusted: [`Method::Checksum`], comparing contents per [`BLOCK`] over the
///   ranges allocated in either file.
///
/// `size` is `new`'s length; the receiver truncates its copy of `base` to it, so a tail past
/// `base`'s end is planned as if `base` had holes there. Pieces are sorted, disjoint, merged
/// when adjacent and of one kind, and end at or before `size`. Blocking I/O.
pub fn plan(new: &Path, base: Option<&Path>, extents_trusted: bool) -> Result<Plan> {
    let new_f = File::open(new).map_err(Error::io("open", new))?;
    let new_meta = new_f.metadata().map_err(Error::io("stat", new))?;
    let size = new_meta.len();
    let Some(base) = base else {
        let pieces = allocated_ranges(&new_f, new, size)?
            .into_iter()
            .map(|(offset, len)| Piece::Data { offset, len })
            .collect();
        return Ok(Plan {
            size,
            method: Method::Full,
            pieces,
        });
    };
    let base_f = File::open(base).map_err(Error::io("open", base))?;
    let base_meta = base_f.metadata().map_err(Error::io("stat", base))?;
    let new_img = Image {
        file: &new_f,
        path: new,
        len: size,
    };
    let base_img = Image {
        file: &base_f,
        path: base,
        len: base_meta.len(),
    };

    // Physical addresses are per filesystem: equal numbers on two devices say nothing.
    if extents_trusted
        && new_meta.dev() == base_meta.dev()
        && let Some(pieces) = plan_extents(&new_img, &base_img)?
    {
        return Ok(Plan {
            size,
            method: Method::Extents,
            pieces,
        });
    }
    Ok(Plan {
        size,
        method: Method::Checksum,
        pieces: plan_checksum(&new_img, &base_img)?,
    })
}

/// The allocated (non-hole, non-unwritten) ranges of an image as (offset, len), merged: for the CSI SnapshotMetadata GetMetadataAllocated RPC.
pub fn allocated(path: &Path) -> Result<Vec<(u64, u64)>> {
    let f = File::open(path).map_err(Error::io("open", path))?;
    let len = f.metadata().map_err(Error::io("stat", path))?.len();
    allocated_ranges(&f, path, len)
}

/// Splits pieces into chunks of at most `max` bytes (Data split; Zero pieces are not split), deterministic so a resumed transfer produces the same sequence.
pub fn chunks(pieces: &[Piece], max: u64) -> impl Iterator<Item = Piece> + '_ {
    assert!(max > 0, "chunk size must be positive");
    pieces.iter().flat_map(move |&p| {
        // A punch costs the same whatever its length, so Zero pieces travel whole.
        let step = match p {
            Piece::Data { .. } => max,
            Piece::Zero { len, .. } => len.max(1),
        };
        let (offset, len) = (p.offset(), p.len());
        (0..len.div_ceil(step)).map(move |i| {
            let o = offset + i * step;
            p.with_range(o, step.min(offset + len - o))
        })
    })
}

struct Image<'a> {
    file: &'a File,
    path: &'a Path,
    len: u64,
}

/// Ranges that may hold data per SEEK_DATA/SEEK_HOLE. Unwritten extents read as holes here
/// (XFS and ext4 report them as data only while they have page-cache contents, which is
/// exactly when they might not read as zeros), and a filesystem without SEEK_DATA support
/// reports the whole file as data, which is still correct, only not sparse.
fn allocated_ranges(f: &File, path: &Path, len: u64) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(f, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(Error::io("seek data", path)(e.into())),
        };
        if data >= len {
            break;
        }
        let hole = rustix::fs::seek(f, SeekFrom::Hole(data))
            .map_err(|e| Error::io("seek hole", path)(e.into()))?
            .min(len);
        match out.last_mut() {
            Some((o, l)) if *o + *l == data => *l += hole - data,
            _ => out.push((data, hole - data)),
        }
        pos = hole;
    }
    Ok(out)
}

/// How one range of a file reads, as far as FIEMAP can tell without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hole or unwritten extent: reads as zeros.
    Zero,
    /// Written data at this physical address (of the range's first byte).
    Mapped(u64),
    /// Data whose address cannot be compared.
    Opaque,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    state: State,
}

/// Flags under which `fe_physical` does not identify the bytes: not yet allocated, not
/// block-aligned, packed with other data, or transformed (compressed/encrypted with per-file
/// keys) so that the same address need not mean the same plaintext.
const OPAQUE: FiemapExtentFlags = FiemapExtentFlags::UNKNOWN
    .union(FiemapExtentFlags::DELALLOC)
    .union(FiemapExtentFlags::ENCODED)
    .union(FiemapExtentFlags::DATA_ENCRYPTED)
    .union(FiemapExtentFlags::NOT_ALIGNED)
    .union(FiemapExtentFlags::DATA_INLINE)
    .union(FiemapExtentFlags::DATA_TAIL);

/// The file's mapping over `[0, cover)` with no gaps (holes and anything past EOF are Zero),
/// or None when the filesystem has no FIEMAP.
fn extent_map(img: &Image, cover: u64) -> Result<Option<Vec<Span>>> {
    let mut spans = Vec::new();
    let mut pos = 0u64;
    let limit = img.len.min(cover);
    // SYNC makes the kernel write dirty pages back first: until then a buffered write to a
    // reflinked file sits in the CoW fork and FIEMAP still reports the old shared block.
    for ext in Fiemap::with_flags(img.file, FiemapFlags::SYNC) {
        let ext = match ext {
            Ok(e) => e,
            Err(e) if fiemap_unsupported(&e) => return Ok(None),
            Err(e) => return Err(Error::io("fiemap", img.path)(e)),
        };
        // Extents may reach past EOF (speculative preallocation); nothing there is read.
        let start = ext.fe_logical.max(pos);
        let end = ext.fe_logical.saturating_add(ext.fe_length).min(limit);
        if start >= end {
            if ext.fe_logical >= limit {
                break;
            }
            continue;
        }
        push_span(&mut spans, pos, start, State::Zero);
        let state = if ext.fe_flags.contains(FiemapExtentFlags::UNWRITTEN) {
            State::Zero
        } else if ext.fe_flags.intersects(OPAQUE) {
            State::Opaque
        } else {
            State::Mapped(ext.fe_physical + (start - ext.fe_logical))
        };
        push_span(&mut spans, start, end, state);
        pos = end;
    }
    push_span(&mut spans, pos, cover, State::Zero);
    Ok(Some(spans))
}

fn push_span(spans: &mut Vec<Span>, start: u64, end: u64, state: State) {
    if start < end {
        spans.push(Span { start, end, state });
    }
}

fn fiemap_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY))
}

/// State of a span at `at`, which lies inside it.
fn state_at(s: &Span, at: u64) -> State {
    match s.state {
        State::Mapped(p) => State::Mapped(p + (at - s.start)),
        other => other,
    }
}

fn plan_extents(new: &Image, base: &Image) -> Result<Option<Vec<Piece>>> {
    let size = new.len;
    let Some(new_map) = extent_map(new, size)? else {
        return Ok(None);
    };
    let Some(base_map) = extent_map(base, size)? else {
        return Ok(None);
    };
    let mut cmp = Comparer::new(new, base);
    sweep(&new_map, &base_map, size, |start, end, out| {
        cmp.compare(start, end, out)
    })
    .map(Some)
}

/// Walks two gap-free maps of `[0, size)` together and classifies each common range;
/// ranges FIEMAP cannot decide go to `confirm`, which emits whatever their contents call for.
fn sweep(
    new_map: &[Span],
    base_map: &[Span],
    size: u64,
    mut confirm: impl FnMut(u64, u64, &mut Pieces) -> Result<()>,
) -> Result<Vec<Piece>> {
    let mut out = Pieces::default();
    let (mut i, mut j) = (0, 0);
    let mut at = 0u64;
    while at < size {
        let (n, b) = (&new_map[i], &base_map[j]);
        let end = n.end.min(b.end);
        match (state_at(n, at), state_at(b, at)) {
            (State::Zero, State::Zero) => {}
            (State::Mapped(p), State::Mapped(q)) if p == q => {}
            // Nothing travels for a Zero piece, so there is nothing to save by confirming.
            (State::Zero, _) => out.push(Piece::Zero {
                offset: at,
                len: end - at,
            }),
            (State::Opaque, _) | (_, State::Opaque) => confirm(at, end, &mut out)?,
            (State::Mapped(_), _) => out.push(Piece::Data {
                offset: at,
                len: end - at,
            }),
        }
        at = end;
        if n.end == end {
            i += 1;
        }
        if b.end == end {
            j += 1;
        }
    }
    Ok(out.0)
}

fn plan_checksum(new: &Image, base: &Image) -> Result<Vec<Piece>> {
    let size = new.len;
    let mut ranges = allocated_ranges(new.file, new.path, size)?;
    ranges.extend(allocated_ranges(base.file, base.path, base.len.min(size))?);
    ranges.sort_unstable();
    let mut out = Pieces::default();
    let mut cmp = Comparer::new(new, base);
    // Aligning to BLOCK keeps the comparison grid the same whatever the allocation pattern,
    // so two ranges sharing a block compare it once.
    let mut pos = 0u64;
    for (offset, len) in ranges {
        let start = (offset / BLOCK * BLOCK).max(pos);
        let end = (offset + len).next_multiple_of(BLOCK).min(size);
        if start < end {
            cmp.compare(start, end, &mut out)?;
            pos = end;
        }
    }
    Ok(out.0)
}

/// Compares contents directly rather than by hash: both files are local, so reading both
/// is the cost either way and a hash would only add CPU.
struct Comparer<'a> {
    new: &'a Image<'a>,
    base: &'a Image<'a>,
    new_buf: Vec<u8>,
    base_buf: Vec<u8>,
}

impl<'a> Comparer<'a> {
    fn new(new: &'a Image<'a>, base: &'a Image<'a>) -> Self {
        Comparer {
            new,
            base,
            new_buf: vec![0; BLOCK as usize],
            base_buf: vec![0; BLOCK as usize],
        }
    }

    /// Emits the pieces for `[start, end)` one BLOCK-aligned block at a time.
    fn compare(&mut self, start: u64, end: u64, out: &mut Pieces) -> Result<()> {
        let mut at = start;
        while at < end {
            let stop = ((at / BLOCK + 1) * BLOCK).min(end);
            let n = (stop - at) as usize;
            read_full_at(self.new, &mut self.new_buf[..n], at)?;
            read_full_at(self.base, &mut self.base_buf[..n], at)?;
            if self.new_buf[..n] != self.base_buf[..n] {
                let len = stop - at;
                out.push(if self.new_buf[..n].iter().all(|&b| b == 0) {
                    Piece::Zero { offset: at, len }
                } else {
                    Piece::Data { offset: at, len }
                });
            }
            at = stop;
        }
        Ok(())
    }
}

/// Fills `buf` from `offset`; whatever lies past EOF reads as zeros, which is what the
/// receiver sees once it has truncated its copy to the new size.
fn read_full_at(img: &Image, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match img.file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", img.path)(e)),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Pieces in ascending order, adjacent ones of one kind merged as they arrive.
#[derive(Default)]
struct Pieces(Vec<Piece>);

impl Pieces {
    fn push(&mut self, p: Piece) {
        if p.is_empty() {
            return;
        }
        if let Some(last) = self.0.last_mut() {
            debug_assert!(last.end() <= p.offset(), "pieces arrive in order");
            let same_kind = std::mem::discriminant(last) == std::mem::discriminant(&p);
            if same_kind && last.end() == p.offset() {
                *last = last.with_range(last.offset(), last.len() + p.len());
                return;
            }
        }
        self.0.push(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_data_only() {
        let pieces = [
            Piece::Data { offset: 0, len: 10 },
            Piece::Zero {
                offset: 10,
                len: 100,
            },
            Piece::Data {
                offset: 110,
                len: 4,
            },
        ];
        let got: Vec<Piece> = chunks(&pieces, 4).collect();
        assert_eq!(
            got,
            vec![
                Piece::Data { offset: 0, len: 4 },
                Piece::Data { offset: 4, len: 4 },
                Piece::Data { offset: 8, len: 2 },
                Piece::Zero {
                    offset: 10,
                    len: 100
                },
                Piece::Data {
                    offset: 110,
                    len: 4
                },
            ]
        );
    }

    fn span(start: u64, end: u64, state: State) -> Span {
        Span { start, end, state }
    }

    #[test]
    fn sweep_classifies_by_mapping() {
        use State::*;
        let new = [
            span(0, 8, Mapped(100)),
            span(8, 16, Opaque),
            span(16, 24, Zero),
            span(24, 32, Mapped(500)),
            span(32, 40, Zero),
        ];
        let base = [
            // Same blocks for 0..4, then the same physical run shifted: changed.
            span(0, 4, Mapped(100)),
            span(4, 12, Mapped(900)),
            span(12, 20, Mapped(300)),
            span(20, 28, Zero),
            span(28, 36, Mapped(504)),
            span(36, 40, Opaque),
        ];
        let mut confirmed = Vec::new();
        let got = sweep(&new, &base, 40, |s, e, out| {
            confirmed.push((s, e));
            // Pretend the contents differ only in the first byte.
            out.push(Piece::Data { offset: s, len: 1 });
            Ok(())
        })
        .unwrap();
        assert_eq!(confirmed, vec![(8, 12), (12, 16)]);
        assert_eq!(
            got,
            vec![
                Piece::Data { offset: 4, len: 5 },
                Piece::Data { offset: 12, len: 1 },
                Piece::Zero { offset: 16, len: 4 },
                Piece::Data { offset: 24, len: 4 },
                Piece::Zero { offset: 32, len: 8 },
            ]
        );
    }

    #[test]
    fn pieces_merge_adjacent_same_kind() {
        let mut p = Pieces::default();
        p.push(Piece::Data { offset: 0, len: 4 });
        p.push(Piece::Data { offset: 4, len: 4 });
        p.push(Piece::Zero { offset: 8, len: 4 });
        p.push(Piece::Zero { offset: 16, len: 0 });
        p.push(Piece::Data { offset: 20, len: 4 });
        assert_eq!(
            p.0,
            vec![
                Piece::Data { offset: 0, len: 8 },
                Piece::Zero { offset: 8, len: 4 },
                Piece::Data { offset: 20, len: 4 },
            ]
        );
    }
}
