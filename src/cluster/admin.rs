//! `berth migrate`: pre-warming a move while the volume stays in use.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Cluster, Placement};
use crate::{
    error::{Error, Result},
    proto::admin::v1::{self as pb, admin_server::Admin},
    service::convert,
};

/// Rounds stop once one ships at most this much: the rest is what the cut-over ships.
const SETTLED_BYTES: u64 = 64 << 20;
/// A volume written faster than the network can ship never settles; stop trying then.
const MAX_ROUNDS: u32 = 8;

#[derive(Debug, Clone)]
pub struct AdminService {
    cluster: Arc<Cluster>,
}

impl AdminService {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

async fn prewarm(
    cluster: Arc<Cluster>,
    req: pb::MigrateRequest,
    tx: mpsc::Sender<Result<pb::MigrateProgress, Status>>,
) -> Result<()> {
    let vol = convert::existing_volume_id(&req.volume_id)?;
    let to = convert::required(&req.to_node_id, "to_node_id")?.to_string();
    cluster.member(&to)?;
    let _g = cluster.inflight.try_lock([vol.to_string()])?;
    for round in 1..=MAX_ROUNDS {
        let invs = cluster.inventories().await;
        let p = Placement::of(&vol, &invs)?;
        let primary = p
            .primary
            .clone()
            .ok_or_else(|| Error::VolumeNotFound(vol.to_string()))?;
        if primary.node == to {
            let _ = tx
                .send(Ok(pb::MigrateProgress {
                    phase: "ready".into(),
                    round,
                    message: format!("volume {vol} already lives on {to}"),
                    ..Default::default()
                }))
                .await;
            return Ok(());
        }
        let report = |f: &crate::proto::agent::v1::FetchProgress| {
            let _ = tx.try_send(Ok(pb::MigrateProgress {
                phase: "copying".into(),
                bytes_done: f.bytes_done,
                bytes_total: f.bytes_total,
                round,
                message: String::new(),
            }));
        };
        let shipped = cluster
            .replicate(&vol, &primary, std::slice::from_ref(&to), &report)
            .await?;
        let bytes = shipped.first().map_or(0, |(_, b)| *b);
        if bytes <= SETTLED_BYTES || round == MAX_ROUNDS {
            let _ = tx
                .send(Ok(pb::MigrateProgress {
                    phase: "ready".into(),
                    bytes_done: bytes,
                    bytes_total: bytes,
                    round,
                    message: format!(
                        "{to} is {bytes} bytes behind {}; publish the volume on {to} to cut over",
                        primary.node
                    ),
                }))
                .await;
            return Ok(());
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Admin for AdminService {
    type MigrateStream = ReceiverStream<Result<pb::MigrateProgress, Status>>;

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, to = %req.get_ref().to_node_id))]
    async fn migrate(
        &self,
        req: Request<pb::MigrateRequest>,
    ) -> Result<Response<Self::MigrateStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let cluster = self.cluster.clone();
        let req = req.into_inner();
        tokio::spawn(async move {
            if let Err(e) = prewarm(cluster, req, tx.clone()).await {
                tracing::warn!(error = %e, "pre-warm failed");
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
