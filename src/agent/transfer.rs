//! Shipping a snapshot image between nodes.
//!
//! The sender plans the changed ranges (`storage::delta`), then streams them in chunks of at
//! most [`CHUNK`] bytes of data (a Zero piece travels whole, as one small message: it carries
//! no bytes) through a small bounded queue, so a slow receiver slows the reader (HTTP/2 flow
//! control does the rest) and memory stays at a few chunks. Every chunk
//! carries its BLAKE3; the trailer carries a digest over all chunks' (offset, length, kind,
//! digest) in order, so a dropped, repeated or reordered chunk fails the transfer as surely
//! as a flipped bit.
//!
//! The receiver assembles the image in `incoming/` (never where a snapshot or volume is
//! looked for), starting from its copy of the base. Every [`SYNC_EVERY`] bytes it makes the
//! image durable and records how far it got, so a cut connection or a crash resumes from
//! there. Only a verified image is renamed into place.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tonic::{Status, transport::Channel};

use crate::{
    error::{Error, Result},
    proto::agent::v1::{self as pb, agent_client::AgentClient, send_message::Body},
    storage::{
        MIB, ReplicaRecord, SnapshotId, SnapshotRecord, VolumeId, VolumeRecord,
        delta::{self, Piece},
        guard::{Guard, InFlight},
        pool::{IncomingProgress, Pool},
    },
    util::{failpoint, fsutil},
};

/// Largest chunk on the wire: big enough that per-message costs vanish, small enough that
/// a resumed transfer repeats little.
pub const CHUNK: u64 = 4 * MIB;
/// Chunks in flight between the sender's reader and the network.
const QUEUE: usize = 4;
/// Chunks smaller than this travel together, up to [`BATCH_BYTES`] a message.
const BATCH_BELOW: u64 = 256 * 1024;
const BATCH_BYTES: u64 = MIB;
/// Pieces the sender asks the kernel to read ahead of the one it sends.
const READ_AHEAD: usize = 64;
/// How much is applied between durable progress records.
const SYNC_EVERY: u64 = 64 * MIB;
/// The gRPC message limit both sides use: a chunk plus framing.
pub const MAX_MESSAGE: usize = (CHUNK + MIB) as usize;

const KIND_DATA: u8 = 0;
const KIND_ZERO: u8 = 1;

/// What crossed the wire, for operators and for tests that assert "only the change moved".
#[derive(Debug, Default)]
pub struct Counters {
    sent_data: AtomicU64,
    sent_zero: AtomicU64,
    received_data: AtomicU64,
    received_zero: AtomicU64,
    completed: AtomicU64,
    resumed: AtomicU64,
    rejected: AtomicU64,
}

impl Counters {
    pub fn to_proto(&self) -> pb::TransferCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        pb::TransferCounters {
            sent_data_bytes: g(&self.sent_data),
            sent_zero_bytes: g(&self.sent_zero),
            received_data_bytes: g(&self.received_data),
            received_zero_bytes: g(&self.received_zero),
            transfers_completed: g(&self.completed),
            transfers_resumed: g(&self.resumed),
            chunks_rejected: g(&self.rejected),
        }
    }
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// One chunk's entry in the image digest.
fn entry(offset: u64, len: u64, kind: u8, digest: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(49);
    e.extend_from_slice(&offset.to_le_bytes());
    e.extend_from_slice(&len.to_le_bytes());
    e.push(kind);
    e.extend_from_slice(digest);
    e
}

const ENTRY_LEN: usize = 49;

fn plan_digest(size: u64, chunks: &[Piece]) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&size.to_le_bytes());
    for c in chunks {
        let (kind, offset, len) = match *c {
            Piece::Data { offset, len } => (KIND_DATA, offset, len),
            Piece::Zero { offset, len } => (KIND_ZERO, offset, len),
        };
        h.update(&[kind]);
        h.update(&offset.to_le_bytes());
        h.update(&len.to_le_bytes());
    }
    h.finalize().as_bytes().to_vec()
}

pub fn parse_snapshot(s: &str, field: &'static str) -> Result<SnapshotId> {
    SnapshotId::parse(s).ok_or_else(|| Error::invalid(field, format!("{s:?} is not a snapshot id")))
}

pub type SendStream = tokio_stream::wrappers::ReceiverStream<Result<pb::SendMessage, Status>>;

/// The sending side of [`pb::SendRequest`].
pub async fn send(
    pool: Arc<Pool>,
    counters: Arc<Counters>,
    req: pb::SendRequest,
) -> Result<SendStream> {
    let id = parse_snapshot(&req.snapshot_id, "snapshot_id")?;
    let rec = pool.any_ready_snapshot(&id)?;
    // A shipping snapshot is only sent as one, and a CSI snapshot only as one.
    let want_shipping = req.kind == pb::SnapshotKind::Shipping as i32;
    if rec.shipping != want_shipping {
        return Err(Error::SnapshotNotFound(id.to_string()));
    }
    let base = if req.base_snapshot_id.is_empty() {
        None
    } else {
        let b = parse_snapshot(&req.base_snapshot_id, "base_snapshot_id")?;
        // The base must be of the same volume: a delta against anything else is garbage.
        let b = pool.any_ready_snapshot(&b)?;
        if b.source_volume != rec.source_volume {
            return Err(Error::invalid(
                "base_snapshot_id",
                format!("{} is a snapshot of another volume", b.id),
            ));
        }
        Some(pool.snapshot_image(&b.id))
    };
    let image = pool.snapshot_image(&id);
    let trusted = pool.reflink();
    let image2 = image.clone();
    let plan = tokio::task::spawn_blocking(move || delta::plan(&image2, base.as_deref(), trusted))
        .await
        .expect("plan task panicked")?;
    let chunks: Vec<Piece> = delta::chunks(&plan.pieces, CHUNK).collect();
    let header = pb::TransferHeader {
        size_bytes: plan.size,
        plan_digest: plan_digest(plan.size, &chunks),
        data_bytes: plan.data_bytes(),
        zero_bytes: plan.zero_bytes(),
        chunks: chunks.len() as u64,
        method: format!("{:?}", plan.method).to_lowercase(),
        source_volume_id: rec.source_volume.to_string(),
        snapshot_name: rec.name.clone(),
        created_unix_nanos: rec.created_unix_nanos as i64,
    };
    tracing::info!(snapshot.id = %id, base = %req.base_snapshot_id, method = %header.method,
        data_bytes = header.data_bytes, size = plan.size, resume_offset = req.resume_offset, "sending snapshot");
    let (tx, rx) = mpsc::channel(QUEUE);
    let resume = req.resume_offset;
    // A fenced volume's final snapshot is a hard link to its image: once a cancelled
    // hand-off unfences the volume (which deletes the snapshot first), the image is written
    // again, and what this stream reads from then on is torn. Every byte read before the
    // snapshot is seen still in place was read before any such write.
    let still_there = move || -> Result<()> {
        match pool.any_ready_snapshot(&id) {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::FailedPrecondition(format!(
                "snapshot {id} was deleted while it was sent (a cancelled hand-off); what was sent must not be kept"
            ))),
        }
    };
    tokio::task::spawn_blocking(move || {
        let msg = |b: Body| Ok(pb::SendMessage { body: Some(b) });
        if tx.blocking_send(msg(Body::Header(header))).is_err() {
            return;
        }
        if let Err(e) = stream_chunks(&image, &chunks, resume, &counters, &tx, &still_there) {
            let _ = tx.blocking_send(Err(e.into()));
        }
    });
    Ok(SendStream::new(rx))
}

fn stream_chunks(
    image: &Path,
    chunks: &[Piece],
    resume: u64,
    counters: &Counters,
    tx: &mpsc::Sender<Result<pb::SendMessage, Status>>,
    still_there: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let f = File::open(image).map_err(Error::io("open", image))?;
    let mut digest = blake3::Hasher::new();
    // Reads run ahead of the stream: the kernel is asked for the next pieces while this
    // one is sent, so a delta of scattered blocks is read with many requests in flight
    // rather than one at a time.
    let mut hinted = 0;
    let mut batch = Batch::default();
    for (i, c) in chunks.iter().enumerate() {
        while hinted < chunks.len() && hinted < i + READ_AHEAD {
            if let Piece::Data { offset, len } = chunks[hinted]
                && offset >= resume
                && len < BATCH_BELOW
            {
                advise(&f, offset, len, rustix::fs::Advice::WillNeed);
            }
            hinted += 1;
        }
        let chunk = match *c {
            Piece::Data { offset, len } => {
                let data = read_at(&f, offset, len).map_err(Error::io("read", image))?;
                if len >= BATCH_BELOW {
                    // Read once: keeping it cached would only push out pages worth keeping.
                    advise(&f, offset, len, rustix::fs::Advice::DontNeed);
                }
                let d = blake3::hash(&data);
                digest.update(&entry(offset, len, KIND_DATA, d.as_bytes()));
                // Chunks a resumed receiver already holds are read for the digest only.
                if offset < resume {
                    continue;
                }
                add(&counters.sent_data, len);
                pb::Chunk {
                    offset,
                    data: data.into(),
                    zero_length: 0,
                    digest: d.as_bytes().to_vec(),
                }
            }
            Piece::Zero { offset, len } => {
                let d = blake3::hash(&[]);
                digest.update(&entry(offset, len, KIND_ZERO, d.as_bytes()));
                if offset < resume {
                    continue;
                }
                add(&counters.sent_zero, len);
                pb::Chunk {
                    offset,
                    data: Default::default(),
                    zero_length: len,
                    digest: d.as_bytes().to_vec(),
                }
            }
        };
        let size = chunk.data.len() as u64;
        if size >= BATCH_BELOW {
            if !batch.flush(tx) {
                return Ok(());
            }
            failpoint::hit("send:chunk");
            if tx
                .blocking_send(Ok(pb::SendMessage {
                    body: Some(Body::Chunk(chunk)),
                }))
                .is_err()
            {
                // The receiver went away; it resumes with a new request.
                return Ok(());
            }
        } else {
            batch.bytes += size;
            batch.chunks.push(chunk);
            if batch.bytes >= BATCH_BYTES && !batch.flush(tx) {
                return Ok(());
            }
        }
    }
    if !batch.flush(tx) {
        return Ok(());
    }
    // Without its trailer nothing of the stream verifies, so nothing of it is kept.
    still_there()?;
    let _ = tx.blocking_send(Ok(pb::SendMessage {
        body: Some(Body::Trailer(pb::TransferTrailer {
            image_digest: digest.finalize().as_bytes().to_vec(),
        })),
    }));
    Ok(())
}

/// Alignment of memory, offsets and lengths for direct I/O: the largest logical block size
/// a pool device may have.
const DIRECT_ALIGN: usize = 4096;

/// Writes received data into the image being assembled. Large aligned chunks (a full copy
/// or long changed runs) go around the page cache: through it, a fresh image's pages are
/// first dirtied in memory and then written back in bursts, at each checkpoint's fsync,
/// while nothing is received; and page-cache writes into newly allocated memory are the
/// slowest step of a transfer on a VM (docs/BENCHMARKS.md). Small pieces, which land in a
/// clone of the base where each must be copied-on-write, stay buffered: written back
/// together in ascending order they cost less than one synchronous direct write each.
struct ImageWriter {
    /// None where the filesystem refuses direct I/O; everything is buffered then.
    direct: Option<File>,
    aligned: Vec<u8>,
}

impl ImageWriter {
    fn new(img: &Path) -> ImageWriter {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(img)
            .ok();
        ImageWriter {
            direct,
            aligned: Vec::new(),
        }
    }

    fn write(&mut self, buffered: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
        let aligned = |n: u64| n.is_multiple_of(DIRECT_ALIGN as u64);
        if let Some(direct) = &self.direct
            && data.len() as u64 >= BATCH_BELOW
            && aligned(offset)
            && aligned(data.len() as u64)
        {
            if self.aligned.len() < data.len() + DIRECT_ALIGN {
                self.aligned = vec![0; data.len().max(CHUNK as usize) + DIRECT_ALIGN];
            }
            let start = self.aligned.as_ptr().align_offset(DIRECT_ALIGN);
            let buf = &mut self.aligned[start..start + data.len()];
            buf.copy_from_slice(data);
            match direct.write_all_at(buf, offset) {
                Ok(()) => return Ok(()),
                // Alignment this device does not take: buffered from now on.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        buffered.write_all_at(data, offset)
    }
}

/// `len` bytes of `f` at `offset`, read straight into the buffer the message takes over
/// (no zeroing, no copy from a reusable read buffer: a chunk is 4 MiB).
fn read_at(f: &File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(len as usize);
    let mut r = f;
    r.seek(SeekFrom::Start(offset))?;
    r.take(len).read_to_end(&mut data)?;
    if data.len() as u64 != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(data)
}

/// Hints the page cache about a range of `f`. Hints only: a kernel that ignores them costs
/// speed, never correctness.
fn advise(f: &File, offset: u64, len: u64, advice: rustix::fs::Advice) {
    let _ = rustix::fs::fadvise(f, offset, std::num::NonZeroU64::new(len), advice);
}

/// Small chunks waiting to travel together.
#[derive(Default)]
struct Batch {
    chunks: Vec<pb::Chunk>,
    bytes: u64,
}

impl Batch {
    /// Sends what is waiting; false when the receiver went away.
    fn flush(&mut self, tx: &mpsc::Sender<Result<pb::SendMessage, Status>>) -> bool {
        if self.chunks.is_empty() {
            return true;
        }
        failpoint::hit("send:chunk");
        self.bytes = 0;
        let chunks = std::mem::take(&mut self.chunks);
        tx.blocking_send(Ok(pb::SendMessage {
            body: Some(Body::Batch(pb::ChunkBatch { chunks })),
        }))
        .is_ok()
    }
}

/// What a receive is asked to produce.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub volume: VolumeId,
    pub snapshot: SnapshotId,
    pub base: Option<SnapshotId>,
    pub shipping: bool,
    pub source_node: String,
    pub epoch: u64,
    pub template: Option<VolumeRecord>,
    /// The controller's grant, passed on to the sender.
    pub grant: Option<pb::Grant>,
}

impl Fetch {
    pub fn from_proto(req: &pb::FetchRequest) -> Result<Fetch> {
        let volume = VolumeId::parse(&req.volume_id).ok_or_else(|| {
            Error::invalid(
                "volume_id",
                format!("{:?} is not a volume id", req.volume_id),
            )
        })?;
        let snapshot = parse_snapshot(&req.snapshot_id, "snapshot_id")?;
        let base = (!req.base_snapshot_id.is_empty())
            .then(|| parse_snapshot(&req.base_snapshot_id, "base_snapshot_id"))
            .transpose()?;
        let shipping = match pb::SnapshotKind::try_from(req.kind) {
            Ok(pb::SnapshotKind::Shipping) => true,
            Ok(pb::SnapshotKind::Csi) => false,
            _ => return Err(Error::invalid("kind", "must be SHIPPING or CSI")),
        };
        let template = match &req.template {
            Some(t) if !t.record_json.is_empty() => Some(
                serde_json::from_str::<VolumeRecord>(&t.record_json)
                    .map_err(|e| Error::invalid("template", e.to_string()))?,
            ),
            _ => None,
        };
        if shipping && template.as_ref().is_none_or(|t| t.id != volume) {
            return Err(Error::invalid(
                "template",
                "a shipping fetch needs the volume's record",
            ));
        }
        Ok(Fetch {
            volume,
            snapshot,
            base,
            shipping,
            source_node: req.source_node_id.clone(),
            epoch: req.epoch,
            template,
            grant: req.grant.clone(),
        })
    }
}

/// Progress reports go to whoever asked. When the asker goes away (its controller gave up
/// or died), the transfer stops at once: what was applied up to its last checkpoint stays
/// for a resume, and nothing is recorded.
pub type Progress = mpsc::Sender<Result<pb::FetchProgress, Status>>;

/// What a receive answers to besides its asker: the node's lock of the volume, under which
/// the records are written, and a flag set when the volume is forgotten here (deleted).
pub struct Bounds {
    pub inflight: InFlight,
    pub forgotten: watch::Receiver<bool>,
}

impl Bounds {
    /// Under the volume's lock, whether what a receive got may still be recorded: a receive
    /// can outlive its reason (the controller gave up, the volume was deleted, or promoted
    /// here, or a cancelled hand-off made its epoch stale), and a record written then would
    /// resurrect a copy nobody wants. The lock is held until the records are written.
    fn admit(&self, pool: &Pool, job: &Fetch, progress: &Progress) -> Result<Guard> {
        let guard = self.inflight.try_lock([job.volume.to_string()])?;
        if progress.is_closed() {
            return Err(Error::FailedPrecondition(format!(
                "the asker of snapshot {} went away",
                job.snapshot
            )));
        }
        // Only a copy of the volume goes with it: a CSI snapshot being imported outlives
        // the volume it was cut from.
        let refused = if job.shipping && *self.forgotten.borrow() {
            Some(format!("volume {} was deleted meanwhile", job.volume))
        } else if !job.shipping {
            None
        } else if let Some(v) = pool.volume(&job.volume)? {
            Some(format!(
                "this node holds volume {} itself now (epoch {})",
                v.id, v.epoch
            ))
        } else {
            let floor = pool.epoch_floor(&job.volume)?;
            (job.epoch < floor).then(|| {
                format!(
                    "epoch {} of volume {} is stale here (a hand-off was cancelled; the floor is {floor})",
                    job.epoch, job.volume
                )
            })
        };
        match refused {
            Some(why) => {
                pool.discard_incoming(&job.snapshot)?;
                Err(Error::FailedPrecondition(format!(
                    "snapshot {} is not kept: {why}",
                    job.snapshot
                )))
            }
            None => Ok(guard),
        }
    }

    /// Resolves when the volume is forgotten here; never otherwise.
    async fn forgotten(&self) {
        let mut f = self.forgotten.clone();
        if f.wait_for(|f| *f).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The receiving side: pulls `job.snapshot` from the peer behind `channel` and keeps it.
pub async fn receive(
    pool: Arc<Pool>,
    counters: Arc<Counters>,
    channel: Channel,
    job: Fetch,
    progress: Progress,
    bounds: Bounds,
) -> Result<()> {
    if pool.any_ready_snapshot(&job.snapshot).is_ok() {
        let lock = bounds.admit(&pool, &job, &progress)?;
        finish_bookkeeping(&pool, &job)?;
        // Released before "done" is reported: the asker's next step (a Promote) takes it.
        drop(lock);
        let _ = progress
            .send(Ok(pb::FetchProgress {
                done: true,
                ..Default::default()
            }))
            .await;
        return Ok(());
    }
    if job.shipping
        && let Some(v) = pool.volume(&job.volume)?
    {
        return Err(Error::FailedPrecondition(format!(
            "this node holds volume {} itself (epoch {}); it cannot receive a replica of it",
            v.id, v.epoch
        )));
    }
    let [img, progress_path, chunks_path] = pool.incoming(&job.snapshot);
    let mut state = fsutil::read_json::<IncomingProgress>(&progress_path)?
        .filter(|p| p.base == job.base && p.volume == job.volume && img.exists());
    let resumed = state.is_some();
    if state.is_none() {
        pool.discard_incoming(&job.snapshot)?;
        match &job.base {
            Some(b) => {
                let base = pool.any_ready_snapshot(b)?;
                let (src, dst, reflink) =
                    (pool.snapshot_image(&base.id), img.clone(), pool.reflink());
                tokio::task::spawn_blocking(move || fsutil::clone_file(&src, &dst, reflink))
                    .await
                    .expect("clone task panicked")?;
            }
            None => {
                File::create_new(&img).map_err(Error::io("create", &img))?;
            }
        }
    }
    let mut client = AgentClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let resume_offset = state.as_ref().map_or(0, |s| s.next_offset);
    let mut stream = client
        .send(pb::SendRequest {
            snapshot_id: job.snapshot.to_string(),
            kind: if job.shipping {
                pb::SnapshotKind::Shipping
            } else {
                pb::SnapshotKind::Csi
            } as i32,
            base_snapshot_id: job.base.as_ref().map(|b| b.to_string()).unwrap_or_default(),
            resume_offset,
            grant: job.grant.clone(),
        })
        .await
        .map_err(|status| Error::Peer {
            node: job.source_node.clone(),
            status,
        })?
        .into_inner();
    let peer_err = |status: Status| Error::Peer {
        node: job.source_node.clone(),
        status,
    };
    let header = match stream.message().await.map_err(peer_err)? {
        Some(pb::SendMessage {
            body: Some(Body::Header(h)),
        }) => h,
        _ => return Err(verify_err(&job, "the stream did not start with a header")),
    };
    let plan = hex(&header.plan_digest);
    if let Some(s) = &state
        && s.plan_digest != plan
    {
        // The sender's plan changed (its filesystem rearranged the extents): what was
        // applied follows another plan, so start over.
        pool.discard_incoming(&job.snapshot)?;
        return Err(Error::Aborted(format!(
            "transfer of {} changed plan; retry starts over",
            job.snapshot
        )));
    }
    let mut st = state.take().unwrap_or(IncomingProgress {
        volume: job.volume.clone(),
        snapshot: job.snapshot.clone(),
        base: job.base.clone(),
        plan_digest: plan,
        next_offset: 0,
        chunks: 0,
        bytes_done: 0,
        reserved_bytes: 0,
    });
    // Room first, before a byte is written: a receive resumed under the same plan already
    // holds its reservation.
    if st.reserved_bytes == 0 && header.data_bytes > 0 {
        st.reserved_bytes = header.data_bytes;
        if let Err(e) = pool.reserve_incoming(&st).await {
            pool.discard_incoming(&job.snapshot)?;
            return Err(e);
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .map_err(Error::io("open", &img))?;
    if file.metadata().map_err(Error::io("stat", &img))?.len() != header.size_bytes {
        file.set_len(header.size_bytes)
            .map_err(Error::io("resize", &img))?;
    }
    let mut chunks_file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(&chunks_path)
        .map_err(Error::io("open", &chunks_path))?;
    // Entries past the last durable progress belong to chunks that will come again.
    chunks_file
        .set_len(st.chunks * ENTRY_LEN as u64)
        .map_err(Error::io("truncate", &chunks_path))?;
    chunks_file
        .seek(SeekFrom::End(0))
        .map_err(Error::io("seek", &chunks_path))?;
    let (apply, applied) = Sink {
        writer: ImageWriter::new(&img),
        img: img.clone(),
        file,
        // Buffered: a delta of scattered blocks is thousands of small chunks, and one
        // write call per 49-byte entry would cost more than the entries themselves.
        chunks_file: std::io::BufWriter::with_capacity(1 << 20, chunks_file),
        chunks_path: chunks_path.clone(),
        progress_path,
    }
    .spawn();
    let total = header.data_bytes + header.zero_bytes;
    let _ = progress
        .send(Ok(pb::FetchProgress {
            bytes_done: st.bytes_done,
            bytes_total: total,
            done: false,
            resumed,
            method: header.method.clone(),
        }))
        .await;
    let streamed = Receiving {
        header: &header,
        job: &job,
        counters: &counters,
        progress: &progress,
        bounds: &bounds,
        resumed,
    }
    .stream_into(&mut stream, &apply, &mut st)
    .await;
    // The applier finishes what it was handed before anything else touches the image,
    // whatever ended the stream: a retry must not race a late write.
    drop(apply);
    let Sink {
        file,
        mut chunks_file,
        ..
    } = applied.await.expect("applier panicked")?;
    let trailer = streamed?;
    let ours = tokio::task::block_in_place(|| -> Result<Vec<u8>> {
        chunks_file
            .flush()
            .map_err(Error::io("write", &chunks_path))?;
        let mut all = Vec::new();
        File::open(&chunks_path)
            .and_then(|mut f| f.read_to_end(&mut all))
            .map_err(Error::io("read", &chunks_path))?;
        Ok(blake3::hash(&all).as_bytes().to_vec())
    })?;
    if ours != trailer.image_digest || st.chunks != header.chunks {
        add(&counters.rejected, 1);
        // What was applied cannot be trusted: start the next attempt from scratch.
        pool.discard_incoming(&job.snapshot)?;
        return Err(verify_err(
            &job,
            "the image digest does not match the sender's",
        ));
    }
    tokio::task::block_in_place(|| file.sync_all().map_err(Error::io("fsync", &img)))?;
    drop(file);
    failpoint::hit("receive:before-accept");
    let lock = bounds.admit(&pool, &job, &progress)?;
    pool.accept_incoming(SnapshotRecord {
        id: job.snapshot.clone(),
        name: header.snapshot_name.clone(),
        source_volume: job.volume.clone(),
        size_bytes: header.size_bytes,
        group: None,
        state: crate::storage::RecordState::Ready,
        reserved_bytes: 0,
        created_unix_nanos: header.created_unix_nanos.max(0) as u128,
        shipping: job.shipping,
        kind: None,
    })?;
    failpoint::hit("receive:before-record");
    finish_bookkeeping(&pool, &job)?;
    // Released before "done" is reported: the asker's next step (a Promote) takes it, and
    // would be refused ABORTED while this receive still held it.
    drop(lock);
    add(&counters.completed, 1);
    if resumed {
        add(&counters.resumed, 1);
    }
    tracing::info!(snapshot.id = %job.snapshot, volume.id = %job.volume, bytes = st.bytes_done, resumed, "snapshot received and verified");
    let _ = progress
        .send(Ok(pb::FetchProgress {
            bytes_done: st.bytes_done,
            bytes_total: total,
            done: true,
            resumed,
            method: header.method,
        }))
        .await;
    Ok(())
}

/// What a receive checks chunks against and reports to.
struct Receiving<'a> {
    header: &'a pb::TransferHeader,
    job: &'a Fetch,
    counters: &'a Counters,
    progress: &'a Progress,
    bounds: &'a Bounds,
    resumed: bool,
}

impl Receiving<'_> {
    /// Reads chunks off the stream, verifies each and hands it to the applier, until the
    /// trailer.
    async fn stream_into(
        &self,
        stream: &mut tonic::Streaming<pb::SendMessage>,
        apply: &mpsc::Sender<Apply>,
        st: &mut IncomingProgress,
    ) -> Result<pb::TransferTrailer> {
        let Receiving {
            header,
            job,
            counters,
            progress,
            bounds,
            resumed,
        } = *self;
        let peer_err = |status: Status| Error::Peer {
            node: job.source_node.clone(),
            status,
        };
        // The applier only stops early on an error, which it returns when joined.
        let gone = || Error::Aborted("the image writer stopped".into());
        let total = header.data_bytes + header.zero_bytes;
        let mut since_sync = 0u64;
        let mut last_report = Instant::now();
        loop {
            let message = tokio::select! {
                m = stream.message() => m.map_err(peer_err)?,
                _ = progress.closed() => {
                    return Err(Error::FailedPrecondition(format!("the asker of snapshot {} went away", job.snapshot)));
                }
                _ = bounds.forgotten(), if job.shipping => {
                    return Err(Error::FailedPrecondition(format!("volume {} was deleted meanwhile", job.volume)));
                }
            };
            let chunks = match message.and_then(|m| m.body) {
                Some(Body::Chunk(c)) => vec![c],
                Some(Body::Batch(b)) => b.chunks,
                Some(Body::Trailer(t)) => return Ok(t),
                Some(Body::Header(_)) => return Err(verify_err(job, "a second header")),
                None => return Err(verify_err(job, "the stream ended before its trailer")),
            };
            for chunk in chunks {
                let (kind, len) = if chunk.zero_length > 0 {
                    (KIND_ZERO, chunk.zero_length)
                } else {
                    (KIND_DATA, chunk.data.len() as u64)
                };
                let actual = blake3::hash(&chunk.data);
                // CHUNK bounds the bytes a message carries. A Zero chunk carries none and
                // covers its whole piece, which the sender never splits: after a trim, one
                // Zero piece spans the freed gigabytes, and refusing it would fail every
                // retry of the transfer. Its range is checked against the image like any
                // other, and its length is in the image digest.
                let malformed = match kind {
                    KIND_DATA => len > CHUNK,
                    _ => !chunk.data.is_empty(),
                };
                if actual.as_bytes().as_slice() != chunk.digest.as_slice()
                    || malformed
                    || chunk.offset < st.next_offset
                    || chunk.offset.saturating_add(len) > header.size_bytes
                {
                    add(&counters.rejected, 1);
                    return Err(verify_err(
                        job,
                        &format!("chunk at offset {} does not verify", chunk.offset),
                    ));
                }
                let entry = entry(chunk.offset, len, kind, actual.as_bytes());
                let op = if kind == KIND_DATA {
                    add(&counters.received_data, len);
                    Apply::Data {
                        offset: chunk.offset,
                        data: chunk.data,
                        entry,
                    }
                } else {
                    add(&counters.received_zero, len);
                    Apply::Zero {
                        offset: chunk.offset,
                        len,
                        entry,
                    }
                };
                apply.send(op).await.map_err(|_| gone())?;
                st.next_offset = chunk.offset + len;
                st.chunks += 1;
                st.bytes_done += len;
                since_sync += len;
                if since_sync >= SYNC_EVERY {
                    since_sync = 0;
                    apply
                        .send(Apply::Checkpoint(st.clone()))
                        .await
                        .map_err(|_| gone())?;
                }
            }
            if last_report.elapsed() >= Duration::from_millis(500) {
                last_report = Instant::now();
                let _ = progress.try_send(Ok(pb::FetchProgress {
                    bytes_done: st.bytes_done,
                    bytes_total: total,
                    done: false,
                    resumed,
                    method: header.method.clone(),
                }));
            }
        }
    }
}

/// One step for the applier, in stream order.
enum Apply {
    Data {
        offset: u64,
        data: prost::bytes::Bytes,
        entry: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
        entry: Vec<u8>,
    },
    /// Make everything before durable, then record `progress`.
    Checkpoint(IncomingProgress),
}

/// Chunks handed to the applier and not yet written: enough to keep the disk busy while
/// the next ones are received, decrypted and hashed.
const APPLY_QUEUE: usize = 8;

/// What the applier writes to.
struct Sink {
    writer: ImageWriter,
    img: std::path::PathBuf,
    file: File,
    chunks_file: std::io::BufWriter<File>,
    chunks_path: std::path::PathBuf,
    progress_path: std::path::PathBuf,
}

impl Sink {
    /// Starts the applier: a thread that writes received chunks into the image, so the
    /// disk and the network work at the same time rather than in turn. It returns the sink
    /// when the sender is dropped, or its first error.
    fn spawn(mut self) -> (mpsc::Sender<Apply>, tokio::task::JoinHandle<Result<Sink>>) {
        let (tx, mut rx) = mpsc::channel(APPLY_QUEUE);
        let handle = tokio::task::spawn_blocking(move || {
            while let Some(op) = rx.blocking_recv() {
                self.apply(op)?;
            }
            Ok(self)
        });
        (tx, handle)
    }

    fn apply(&mut self, op: Apply) -> Result<()> {
        match op {
            Apply::Data {
                offset,
                data,
                entry,
            } => {
                self.writer
                    .write(&self.file, &data, offset)
                    .map_err(Error::io("write", &self.img))?;
                self.entry(&entry)
            }
            Apply::Zero { offset, len, entry } => {
                punch(&self.file, &self.img, offset, len)?;
                self.entry(&entry)
            }
            Apply::Checkpoint(st) => {
                checkpoint(
                    &self.file,
                    &self.img,
                    &mut self.chunks_file,
                    &self.chunks_path,
                    &self.progress_path,
                    &st,
                )?;
                failpoint::hit("receive:after-checkpoint");
                Ok(())
            }
        }
    }

    fn entry(&mut self, entry: &[u8]) -> Result<()> {
        self.chunks_file
            .write_all(entry)
            .map_err(Error::io("write", &self.chunks_path))
    }
}

fn finish_bookkeeping(pool: &Pool, job: &Fetch) -> Result<()> {
    if !job.shipping {
        return Ok(());
    }
    let Some(template) = &job.template else {
        return Ok(());
    };
    // A replica of an older epoch than the one recorded here would resurrect a stale copy.
    if let Some(r) = pool.replica(&job.volume)?
        && (r.epoch > job.epoch || (r.epoch == job.epoch && r.snapshot == job.snapshot))
    {
        return Ok(());
    }
    pool.set_replica(&ReplicaRecord {
        volume: template.clone(),
        epoch: job.epoch,
        primary: job.source_node.clone(),
        snapshot: job.snapshot.clone(),
        base: job.base.clone(),
    })
}

fn checkpoint(
    file: &File,
    img: &Path,
    chunks_file: &mut std::io::BufWriter<File>,
    chunks_path: &Path,
    progress_path: &Path,
    st: &IncomingProgress,
) -> Result<()> {
    // Data before the record that claims it.
    file.sync_data().map_err(Error::io("fsync", img))?;
    chunks_file
        .flush()
        .map_err(Error::io("write", chunks_path))?;
    chunks_file
        .get_ref()
        .sync_data()
        .map_err(Error::io("fsync", chunks_path))?;
    fsutil::write_json(progress_path, st)
}

fn punch(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(|e| Error::io("punch hole", path)(e.into()))
}

fn verify_err(job: &Fetch, reason: &str) -> Error {
    Error::Verification {
        snapshot: job.snapshot.to_string(),
        reason: reason.to_string(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
