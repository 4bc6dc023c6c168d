//! CSI SnapshotMetadata: which byte ranges of a snapshot hold data, and which changed
//! between two snapshots of a volume. The answers come from the same planner that decides
//! what a hand-off ships (`storage::delta`), so a backup tool sees exactly the ranges berth
//! itself would move.

use std::{path::PathBuf, sync::Arc};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{convert, respond};
use crate::{
    error::{Error, Result},
    proto::csi::v1::{self as csi, snapshot_metadata_server::SnapshotMetadata},
    storage::{
        SnapshotId,
        delta::{self, Piece},
        pool::Pool,
    },
};

/// Ranges per response message when the caller sets no max_results.
const DEFAULT_BATCH: usize = 1024;

#[derive(Debug, Clone)]
pub struct MetadataService {
    pool: Arc<Pool>,
}

impl MetadataService {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self { pool }
    }

    fn snapshot(&self, s: &str, field: &'static str) -> Result<(SnapshotId, u64, PathBuf)> {
        convert::required(s, field)?;
        let id = convert::snapshot_id(s)?.ok_or_else(|| Error::SnapshotNotFound(s.to_string()))?;
        let rec = self.pool.ready_snapshot(&id)?;
        let image = self.pool.snapshot_image(&id);
        Ok((id, rec.size_bytes, image))
    }
}

/// Keeps the ranges at or past `start` (the first one cut to begin there) and checks the
/// offset against the spec's OUT_OF_RANGE rule.
fn from_offset(ranges: Vec<(u64, u64)>, start: i64, capacity: u64) -> Result<Vec<(u64, u64)>> {
    if start < 0 || start as u64 > capacity {
        return Err(Error::OutOfRange(format!(
            "starting_offset {start} is outside the volume's {capacity} bytes"
        )));
    }
    let start = start as u64;
    Ok(ranges
        .into_iter()
        .filter(|&(o, l)| o + l > start)
        .map(|(o, l)| {
            if o < start {
                (start, o + l - start)
            } else {
                (o, l)
            }
        })
        .collect())
}

fn batch_size(max_results: i32) -> Result<usize> {
    match max_results {
        n if n < 0 => Err(Error::invalid("max_results", "must not be negative")),
        0 => Ok(DEFAULT_BATCH),
        n => Ok(n as usize),
    }
}

/// Streams the ranges in messages of at most `batch` entries; `make` wraps one message.
fn stream<T: Send + 'static>(
    ranges: Vec<(u64, u64)>,
    batch: usize,
    make: impl Fn(Vec<csi::BlockMetadata>) -> T + Send + 'static,
) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for chunk in ranges.chunks(batch) {
            let meta = chunk
                .iter()
                .map(|&(o, l)| csi::BlockMetadata {
                    byte_offset: o as i64,
                    size_bytes: l as i64,
                })
                .collect();
            // A caller that went away ends the stream; it resumes with starting_offset.
            if tx.send(Ok(make(meta))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl SnapshotMetadata for MetadataService {
    type GetMetadataAllocatedStream =
        ReceiverStream<Result<csi::GetMetadataAllocatedResponse, Status>>;
    type GetMetadataDeltaStream = ReceiverStream<Result<csi::GetMetadataDeltaResponse, Status>>;

    #[tracing::instrument(skip_all, fields(snapshot.id = %req.get_ref().snapshot_id))]
    async fn get_metadata_allocated(
        &self,
        req: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = req.into_inner();
        let result = async {
            let batch = batch_size(req.max_results)?;
            let (_, capacity, image) = self.snapshot(&req.snapshot_id, "snapshot_id")?;
            let ranges = tokio::task::spawn_blocking(move || delta::allocated(&image))
                .await
                .expect("metadata task panicked")?;
            let ranges = from_offset(ranges, req.starting_offset, capacity)?;
            Ok(stream(ranges, batch, move |block_metadata| {
                csi::GetMetadataAllocatedResponse {
                    block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: capacity as i64,
                    block_metadata,
                }
            }))
        }
        .await;
        respond(result)
    }

    #[tracing::instrument(skip_all, fields(base = %req.get_ref().base_snapshot_id, target = %req.get_ref().target_snapshot_id))]
    async fn get_metadata_delta(
        &self,
        req: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = req.into_inner();
        let result = async {
            let batch = batch_size(req.max_results)?;
            let (_, _, base) = self.snapshot(&req.base_snapshot_id, "base_snapshot_id")?;
            let (target_id, capacity, target) =
                self.snapshot(&req.target_snapshot_id, "target_snapshot_id")?;
            let base_rec = self.pool.ready_snapshot(
                &convert::snapshot_id(&req.base_snapshot_id)?.expect("checked above"),
            )?;
            if base_rec.source_volume != self.pool.ready_snapshot(&target_id)?.source_volume {
                return Err(Error::invalid(
                    "base_snapshot_id",
                    "the two snapshots are of different volumes",
                ));
            }
            let trusted = self.pool.reflink();
            let plan =
                tokio::task::spawn_blocking(move || delta::plan(&target, Some(&base), trusted))
                    .await
                    .expect("metadata task panicked")?;
            // Both kinds of piece are changes: new data, and data that became zeros.
            let ranges = plan
                .pieces
                .iter()
                .map(|p| match *p {
                    Piece::Data { offset, len } | Piece::Zero { offset, len } => (offset, len),
                })
                .collect();
            let ranges = from_offset(ranges, req.starting_offset, capacity)?;
            Ok(stream(ranges, batch, move |block_metadata| {
                csi::GetMetadataDeltaResponse {
                    block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: capacity as i64,
                    block_metadata,
                }
            }))
        }
        .await;
        respond(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_offset_cuts_and_bounds() {
        let r = vec![(0, 10), (20, 10), (40, 5)];
        assert_eq!(from_offset(r.clone(), 0, 100).unwrap(), r);
        assert_eq!(
            from_offset(r.clone(), 25, 100).unwrap(),
            vec![(25, 5), (40, 5)]
        );
        assert_eq!(from_offset(r.clone(), 100, 100).unwrap(), vec![]);
        for bad in [-1, 101] {
            assert_eq!(
                from_offset(r.clone(), bad, 100).unwrap_err().code(),
                tonic::Code::OutOfRange
            );
        }
        assert!(batch_size(-1).is_err());
        assert_eq!(batch_size(0).unwrap(), DEFAULT_BATCH);
    }
}
