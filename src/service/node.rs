//! CSI Node service.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{Context, capabilities, convert, respond};
use crate::{
    error::{Error, Result},
    proto::csi::v1::{self as csi, node_server::Node, volume_capability::access_mode::Mode},
};

#[derive(Debug, Clone)]
pub struct NodeService {
    ctx: Arc<Context>,
}

impl NodeService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    /// A CO path, refused when it lies inside berth's own storage (the pool or the state
    /// directory) or contains it: mounting there would shadow volumes, and unmounting or
    /// removing there would destroy them. Checked both as given and with the symlinks of
    /// its existing part resolved.
    fn co_path(&self, raw: &str, field: &'static str) -> Result<PathBuf> {
        let p = convert::co_path(raw, field)?;
        let resolved = resolve_existing(&p);
        for own in [self.ctx.pool.root(), self.ctx.state_dir.as_path()] {
            let own_resolved = resolve_existing(own);
            for (a, b) in [(p.as_path(), own), (resolved.as_path(), &own_resolved)] {
                if a.starts_with(b) || b.starts_with(a) {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "{} overlaps berth's storage at {}",
                            p.display(),
                            own.display()
                        ),
                    ));
                }
            }
        }
        Ok(p)
    }

    async fn stage(
        &self,
        req: csi::NodeStageVolumeRequest,
    ) -> Result<csi::NodeStageVolumeResponse> {
        // Every field of the request before the volume id is looked up: a missing field is
        // INVALID_ARGUMENT even beside an id that names nothing.
        let staging = self.co_path(&req.staging_target_path, "staging_target_path")?;
        let cap = well_formed_capability(req.volume_capability.as_ref())?;
        let id = convert::existing_volume_id(&req.volume_id)?;
        let usage = node_usage(&id, cap)?;
        let guard = self.ctx.inflight.try_lock([id.to_string()])?;
        let mode = convert::mode(cap).as_str_name();
        // Run in a task of its own, which a dropped request does not cancel: the CO's
        // deadline must not kill a mkfs or an offline resize2fs mid-way (a killed resize2fs
        // can damage the filesystem). The volume's guard is held until the stage ends, so a
        // retry meanwhile gets ABORTED, then finds the stage done.
        let ctx = self.ctx.clone();
        let task = async move {
            let _guard = guard;
            ctx.node.stage(&id, &staging, usage, mode).await
        };
        tokio::spawn(task.in_current_span())
            .await
            .expect("stage task panicked")?;
        Ok(csi::NodeStageVolumeResponse {})
    }

    async fn unstage(
        &self,
        req: csi::NodeUnstageVolumeRequest,
    ) -> Result<csi::NodeUnstageVolumeResponse> {
        let staging = self.co_path(&req.staging_target_path, "staging_target_path")?;
        let id = convert::existing_volume_id(&req.volume_id)?;
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        if let Some(r) = self.ctx.node.record(&id)?
            && r.staging_path != staging
        {
            // Spec: "If the volume corresponding to the volume_id is not staged to the
            // staging_target_path, the Plugin MUST reply 0 OK." The stage elsewhere is left
            // alone.
            tracing::info!(staged_at = %r.staging_path.display(), "volume is not staged at this path");
            return Ok(csi::NodeUnstageVolumeResponse {});
        }
        self.ctx.node.unstage(&id, &staging).await?;
        Ok(csi::NodeUnstageVolumeResponse {})
    }

    async fn publish(
        &self,
        req: csi::NodePublishVolumeRequest,
    ) -> Result<csi::NodePublishVolumeResponse> {
        let target = self.co_path(&req.target_path, "target_path")?;
        let cap = well_formed_capability(req.volume_capability.as_ref())?;
        let id = convert::existing_volume_id(&req.volume_id)?;
        if req.staging_target_path.is_empty() {
            // Spec table: STAGE_UNSTAGE_VOLUME is advertised, so a publish without a staging
            // path is FAILED_PRECONDITION.
            return Err(Error::FailedPrecondition(
                "staging_target_path is required: this plugin stages volumes".into(),
            ));
        }
        let staging = self.co_path(&req.staging_target_path, "staging_target_path")?;
        let usage = node_usage(&id, cap)?;
        let readonly = req.readonly || capabilities::read_only_mode(convert::mode(cap));
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        // Spec, NodePublishVolume's second table: SINGLE_NODE_SINGLE_WRITER at a second
        // target path is FAILED_PRECONDITION.
        if convert::mode(cap) == Mode::SingleNodeSingleWriter
            && let Some(rec) = self.ctx.node.record(&id)?
            && !rec.published.contains_key(&target)
            && let Some(other) = rec.published.keys().next()
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
                other.display()
            )));
        }
        self.ctx
            .node
            .publish(
                &id,
                &staging,
                &target,
                &usage,
                convert::mode(cap).as_str_name(),
                readonly,
            )
            .await?;
        Ok(csi::NodePublishVolumeResponse {})
    }

    async fn unpublish(
        &self,
        req: csi::NodeUnpublishVolumeRequest,
    ) -> Result<csi::NodeUnpublishVolumeResponse> {
        let target = self.co_path(&req.target_path, "target_path")?;
        let id = convert::existing_volume_id(&req.volume_id)?;
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        self.ctx.node.unpublish(&id, &target).await?;
        Ok(csi::NodeUnpublishVolumeResponse {})
    }

    async fn stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse> {
        use csi::volume_usage::Unit;
        let path = Path::new(convert::required(&req.volume_path, "volume_path")?);
        let id = convert::existing_volume_id(&req.volume_id)?;
        // Not checked for shape: a path where the volume is not staged or published (a
        // relative one included) is the table's "does not exist on the specified
        // volume_path", NOT_FOUND, which stats() answers by comparing with its records.
        let st = self.ctx.node.stats(&id, path).await?;
        let mut usage = vec![csi::VolumeUsage {
            available: st.available_bytes as i64,
            total: st.total_bytes as i64,
            used: st.used_bytes as i64,
            unit: Unit::Bytes as i32,
        }];
        if let Some((total, free, used)) = st.inodes {
            usage.push(csi::VolumeUsage {
                available: free as i64,
                total: total as i64,
                used: used as i64,
                unit: Unit::Inodes as i32,
            });
        }
        let volume_condition = Some(match st.abnormal {
            Some(message) => csi::VolumeCondition {
                abnormal: true,
                message,
            },
            None => csi::VolumeCondition {
                abnormal: false,
                message: "volume attached and healthy".into(),
            },
        });
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition,
        })
    }

    async fn expand(
        &self,
        req: csi::NodeExpandVolumeRequest,
    ) -> Result<csi::NodeExpandVolumeResponse> {
        let path = convert::co_path(&req.volume_path, "volume_path")?;
        let (required_bytes, limit_bytes) = convert::capacity(req.capacity_range.as_ref())?;
        let id = convert::existing_volume_id(&req.volume_id)?;
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        let vol = self.ctx.pool.ready_volume(&id)?;
        // "Exceeds capabilities": a capability the volume cannot serve (fits() also rejects
        // malformed and unsupported ones).
        if let Some(cap) = &req.volume_capability
            && let Some(why) = convert::fits(&vol, cap)
        {
            return Err(Error::invalid("volume_capability", why));
        }
        // The node grows to what the controller allocated; a range that size does not
        // satisfy cannot be met here.
        if required_bytes > vol.capacity_bytes
            || (limit_bytes != 0 && limit_bytes < vol.capacity_bytes)
        {
            return Err(Error::OutOfRange(format!(
                "the volume is {} bytes (required {required_bytes}, limit {limit_bytes}); \
                 ControllerExpandVolume sets the size",
                vol.capacity_bytes
            )));
        }
        let bytes = self.ctx.node.expand(&id, &path).await?;
        Ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: bytes as i64,
        })
    }
}

/// `p` with the symlinks of its longest existing prefix resolved; the rest is appended as
/// given (a target the CO has not created yet).
fn resolve_existing(p: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = p;
    loop {
        if let Ok(real) = cur.canonicalize() {
            return rest.iter().rev().fold(real, |acc, c| acc.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                cur = parent;
            }
            _ => return p.to_owned(),
        }
    }
}

/// A REQUIRED capability, present and well formed (INVALID_ARGUMENT otherwise).
fn well_formed_capability(cap: Option<&csi::VolumeCapability>) -> Result<&csi::VolumeCapability> {
    let cap = cap.ok_or(Error::Missing("volume_capability"))?;
    convert::well_formed(cap)?;
    Ok(cap)
}

/// Node RPCs answer an unusable (but well-formed) capability with FAILED_PRECONDITION
/// ("Exceeds capabilities").
fn node_usage(
    id: &crate::storage::VolumeId,
    cap: &csi::VolumeCapability,
) -> Result<crate::storage::node::Usage> {
    if let Some(reason) = convert::unsupported(cap) {
        return Err(Error::CapabilityMismatch {
            volume: id.to_string(),
            reason,
        });
    }
    convert::usage(cap)
}

#[tonic::async_trait]
impl Node for NodeService {
    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        respond(self.stage(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        respond(self.unstage(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        respond(self.publish(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        respond(self.unpublish(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        respond(self.stats(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        respond(self.expand(req.into_inner()).await)
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type};
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: capabilities::NODE
                .iter()
                .map(|&t| csi::NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let info = &self.ctx.info;
        let mut topology = convert::topology(&info.node_id);
        if let Some(d) = &info.topology_domain {
            topology
                .segments
                .insert(super::DOMAIN_KEY.to_string(), d.clone());
        }
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: info.node_id.clone(),
            max_volumes_per_node: info.max_volumes_per_node as i64,
            accessible_topology: Some(topology),
        }))
    }
}
