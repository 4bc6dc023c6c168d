//! `berth migrate`: pre-warming a move while the volume stays in use, for an operator at a
//! terminal (the Admin API) or a VolumeMigration object (Kubernetes, [`ClusterMigrator`]).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Cluster;
use crate::{
    error::{Error, Result},
    kube::Migrator,
    proto::{
        admin::v1::{self as pb, admin_server::Admin},
        agent::v1::FetchProgress,
    },
    service::convert,
    storage::VolumeId,
};

/// Rounds stop once one ships at most this much: the rest is what the cut-over ships.
const SETTLED_BYTES: u64 = 64 << 20;
/// A volume written faster than the network can ship never settles; stop trying then.
const MAX_ROUNDS: u32 = 8;

/// A pre-warm's progress: round, bytes of this round done and in all.
pub type PrewarmProgress<'a> = &'a (dyn Fn(u32, u64, u64) + Send + Sync);

impl Cluster {
    /// Ships `vol` to `to` round after round while it stays in use where it is, until a
    /// round ships at most [`SETTLED_BYTES`]. Returns a sentence for the operator.
    pub async fn prewarm(
        &self,
        vol: &VolumeId,
        to: &str,
        progress: PrewarmProgress<'_>,
    ) -> Result<String> {
        self.member(to)?;
        let _g = self.inflight.try_lock([vol.to_string()])?;
        let mut last = 0;
        for round in 1..=MAX_ROUNDS {
            let p = self.locate(vol).await?;
            let primary = p
                .primary
                .clone()
                .ok_or_else(|| Error::VolumeNotFound(vol.to_string()))?;
            if primary.node == to {
                return Ok(format!("volume {vol} already lives on {to}"));
            }
            let report = |f: &FetchProgress| progress(round, f.bytes_done, f.bytes_total);
            let shipped = self
                .replicate(
                    vol,
                    &primary,
                    std::slice::from_ref(&to.to_string()),
                    &report,
                )
                .await?;
            last = shipped.first().map_or(0, |(_, b)| *b);
            if last <= SETTLED_BYTES {
                return Ok(format!(
                    "{to} is {last} bytes behind {}; publish the volume on {to} to cut over",
                    primary.node
                ));
            }
        }
        Ok(format!(
            "{to} is still {last} bytes behind after {MAX_ROUNDS} rounds (the volume changes about as fast as it ships); the cut-over ships the rest"
        ))
    }
}

#[derive(Debug, Clone)]
pub struct AdminService {
    cluster: Arc<Cluster>,
}

impl AdminService {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, to = %req.get_ref().to_node_id))]
    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let req = req.into_inner();
        let vol = convert::existing_volume_id(&req.volume_id)?;
        let to = (!req.to_node_id.is_empty()).then_some(req.to_node_id.as_str());
        let node = self.cluster.promote_by_hand(&vol, to).await?;
        Ok(Response::new(pb::PromoteResponse {
            primary_node_id: node,
        }))
    }

    #[tracing::instrument(skip_all, fields(node = %req.get_ref().node_id))]
    async fn declare_node_gone(
        &self,
        req: Request<pb::DeclareNodeGoneRequest>,
    ) -> Result<Response<pb::DeclareNodeGoneResponse>, Status> {
        let node = convert::required(&req.get_ref().node_id, "node_id")?.to_string();
        let (failed_over, left) = self.cluster.declare_gone(&node).await?;
        Ok(Response::new(pb::DeclareNodeGoneResponse {
            failed_over,
            left,
        }))
    }

    type MigrateStream = ReceiverStream<Result<pb::MigrateProgress, Status>>;

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, to = %req.get_ref().to_node_id))]
    async fn migrate(
        &self,
        req: Request<pb::MigrateRequest>,
    ) -> Result<Response<Self::MigrateStream>, Status> {
        let req = req.into_inner();
        // Both fields before the volume id is parsed: a missing field is INVALID_ARGUMENT
        // even beside an id that names nothing.
        let to = convert::required(&req.to_node_id, "to_node_id")?.to_string();
        let vol = convert::existing_volume_id(&req.volume_id)?;
        let (tx, rx) = mpsc::channel(64);
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            let report = |round, bytes_done, bytes_total| {
                let _ = tx.try_send(Ok(pb::MigrateProgress {
                    phase: "copying".into(),
                    bytes_done,
                    bytes_total,
                    round,
                    message: String::new(),
                }));
            };
            let done = match cluster.prewarm(&vol, &to, &report).await {
                Ok(message) => Ok(pb::MigrateProgress {
                    phase: "ready".into(),
                    message,
                    ..Default::default()
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "pre-warm failed");
                    Err(e.into())
                }
            };
            let _ = tx.send(done).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// VolumeMigration objects drive the same pre-warm.
#[derive(Debug, Clone)]
pub struct ClusterMigrator(pub Arc<Cluster>);

#[async_trait::async_trait]
impl Migrator for ClusterMigrator {
    async fn prewarm(
        &self,
        volume_id: &str,
        to: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        let vol = convert::existing_volume_id(volume_id)?;
        let report = |_round, done, total| progress(done, total);
        let message = self.0.prewarm(&vol, to, &report).await?;
        tracing::info!(volume.id = %vol, to, %message, "pre-warm for a VolumeMigration done");
        Ok(())
    }

    async fn primary_node(&self, volume_id: &str) -> Result<Option<String>> {
        let vol = convert::existing_volume_id(volume_id)?;
        Ok(self.0.locate(&vol).await?.primary.map(|c| c.node))
    }
}
