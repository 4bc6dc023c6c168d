//! SnapshotMetadata for a cluster: the node holding the snapshot answers; its stream is
//! passed through message by message.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Cluster, peer};
use crate::{
    error::{Error, Result},
    metrics::AgentChannel,
    placement,
    proto::csi::v1::{
        self as csi, snapshot_metadata_client::SnapshotMetadataClient,
        snapshot_metadata_server::SnapshotMetadata,
    },
    service::{convert, respond},
};

#[derive(Debug, Clone)]
pub struct ClusterMetadata {
    cluster: Arc<Cluster>,
}

impl ClusterMetadata {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }

    /// The node holding the CSI snapshot `id`, from the records.
    async fn holder(&self, id: &str, field: &'static str) -> Result<String> {
        convert::required(id, field)?;
        let sid = convert::snapshot_id(id)?.ok_or_else(|| Error::SnapshotNotFound(id.into()))?;
        let Some(found) =
            placement::find_snapshot(self.cluster.store.as_ref(), sid.as_str()).await?
        else {
            return Err(Error::SnapshotNotFound(id.to_string()));
        };
        let node = found
            .record
            .snapshots
            .iter()
            .find(|s| s.snapshot_id == sid.as_str())
            .map(|s| s.node.clone())
            .unwrap_or_default();
        if let Some(reason) = self.cluster.reachable(&node).await {
            return Err(Error::Unreachable {
                node,
                reason: format!("it holds snapshot {sid}: {reason}"),
            });
        }
        Ok(node)
    }

    fn client(&self, node: &str) -> Result<SnapshotMetadataClient<AgentChannel>> {
        Ok(SnapshotMetadataClient::new(self.cluster.channel(node)?))
    }
}

fn pass<T: Send + 'static>(node: String, mut s: Streaming<T>) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let item = match s.message().await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => return,
                Err(e) => Err(Status::from(peer(&node, e))),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl SnapshotMetadata for ClusterMetadata {
    type GetMetadataAllocatedStream =
        ReceiverStream<Result<csi::GetMetadataAllocatedResponse, Status>>;
    type GetMetadataDeltaStream = ReceiverStream<Result<csi::GetMetadataDeltaResponse, Status>>;

    async fn get_metadata_allocated(
        &self,
        req: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = req.into_inner();
        respond(
            async {
                let node = self.holder(&req.snapshot_id, "snapshot_id").await?;
                let s = self
                    .client(&node)?
                    .get_metadata_allocated(req)
                    .await
                    .map_err(|e| peer(&node, e))?
                    .into_inner();
                Ok(pass(node, s))
            }
            .await,
        )
    }

    async fn get_metadata_delta(
        &self,
        req: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = req.into_inner();
        respond(
            async {
                // Both snapshots are cut on the volume's node; the target's holder answers.
                let node = self
                    .holder(&req.target_snapshot_id, "target_snapshot_id")
                    .await?;
                let s = self
                    .client(&node)?
                    .get_metadata_delta(req)
                    .await
                    .map_err(|e| peer(&node, e))?
                    .into_inner();
                Ok(pass(node, s))
            }
            .await,
        )
    }
}
