//! CSI Controller service.

use std::{collections::HashMap, sync::Arc};

use tonic::{Request, Response, Status};

use super::{
    Context, capabilities,
    convert::{self, Shape, required},
    params, respond,
};
use crate::{
    error::{Error, Result},
    proto::csi::v1::{self as csi, controller_server::Controller},
    storage::{Attachment, SnapshotId, VolumeId, VolumeRecord, pool::NewVolume},
};

#[derive(Debug, Clone)]
pub struct ControllerService {
    ctx: Arc<Context>,
}

impl ControllerService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    fn node_id(&self) -> &str {
        &self.ctx.info.node_id
    }

    async fn create_volume(
        &self,
        req: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse> {
        let name = convert::name(&req.name)?;
        let p = params::create_params(&req.parameters, &req.mutable_parameters)?;
        let kind = convert::volume_kind(&req.volume_capabilities, &p)?;
        let (required_bytes, limit_bytes) = convert::capacity(req.capacity_range.as_ref())?;
        let source = convert::content_source(req.volume_content_source.as_ref())?;
        let id = VolumeId::for_name(name);
        if !convert::topology_allows(req.accessibility_requirements.as_ref(), self.node_id()) {
            // Spec: an existing volume of this name that the requirements exclude "already
            // exists but is incompatible" (ALREADY_EXISTS); only a new one is "unable to
            // provision in accessible_topology" (RESOURCE_EXHAUSTED).
            let exists = self
                .ctx
                .pool
                .volume(&id)?
                .is_some_and(|v| v.state == crate::storage::RecordState::Ready);
            if exists {
                return Err(Error::AlreadyExists {
                    kind: "volume",
                    name: name.to_string(),
                    detail: format!("it is accessible only from node {}", self.node_id()),
                });
            }
            return Err(Error::TopologyUnsatisfiable(self.node_id().to_string()));
        }
        // The source is guarded too: it must not be deleted or changed mid-copy.
        let keys = std::iter::once(id.as_str()).chain(source.as_ref().map(|s| s.id()));
        let _guard = self.ctx.inflight.try_lock(keys.collect::<Vec<_>>())?;
        let v = self
            .ctx
            .pool
            .create_volume(NewVolume {
                name: name.to_string(),
                required_bytes,
                limit_bytes,
                kind,
                source,
                settings: p.settings,
                labels: p.labels,
                replication: p.replication,
            })
            .await?;
        Ok(csi::CreateVolumeResponse {
            volume: Some(convert::to_volume(&v, self.node_id())),
        })
    }

    async fn delete_volume(
        &self,
        req: csi::DeleteVolumeRequest,
    ) -> Result<csi::DeleteVolumeResponse> {
        // An id berth never issued names no volume: already gone.
        let Some(id) = convert::volume_id(&req.volume_id)? else {
            return Ok(csi::DeleteVolumeResponse {});
        };
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        self.ctx.pool.delete_volume(&id).await?;
        Ok(csi::DeleteVolumeResponse {})
    }

    async fn publish(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse> {
        // Spec "Error Scheme": a missing field is INVALID_ARGUMENT before any lookup.
        required(&req.volume_id, "volume_id")?;
        let node = required(&req.node_id, "node_id")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or(Error::Missing("volume_capability"))?;
        let id = convert::existing_volume_id(&req.volume_id)?;
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        let mut v = self.ctx.pool.ready_volume(&id)?;
        if node != self.node_id() {
            return Err(Error::NodeNotFound(node.to_string()));
        }
        if let Some(f) = &v.fence {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is handing off to node {} (epoch {})",
                f.to, f.epoch
            )));
        }
        if v.suspended {
            return Err(Error::Suspended(id.to_string()));
        }
        if let Some(why) = convert::fits(&v, cap) {
            return Err(Error::invalid("volume_capability", why));
        }
        let want = Attachment {
            readonly: req.readonly || capabilities::read_only_mode(convert::mode(cap)),
            mode: convert::mode(cap).as_str_name().to_string(),
        };
        match v.published.get(node) {
            Some(have) if *have == want => return Ok(publish_response()),
            // Spec table: "Volume published but is incompatible" → ALREADY_EXISTS.
            Some(have) => {
                return Err(Error::AlreadyExists {
                    kind: "published volume",
                    name: id.to_string(),
                    detail: format!("it is published to {node} as {have:?}"),
                });
            }
            None => {}
        }
        if let Some(other) = v.published.keys().find(|n| n.as_str() != node) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is published to node {other}; single-node volumes cannot be published to two nodes"
            )));
        }
        let on_node = self
            .ctx
            .pool
            .volumes()?
            .iter()
            .filter(|v| v.published.contains_key(node))
            .count();
        if on_node >= self.ctx.info.max_volumes_per_node as usize {
            return Err(Error::MaxVolumes(self.ctx.info.max_volumes_per_node));
        }
        v.published.insert(node.to_string(), want);
        self.ctx.pool.save_volume(&v)?;
        Ok(publish_response())
    }

    async fn unpublish(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse> {
        // Spec: a volume or node that cannot be found "can be safely regarded as
        // ControllerUnpublished": success.
        let Some(id) = convert::volume_id(&req.volume_id)? else {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        };
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        let Some(mut v) = self.ctx.pool.volume(&id)? else {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        };
        let before = v.published.len();
        if req.node_id.is_empty() {
            v.published.clear();
        } else {
            v.published.remove(&req.node_id);
        }
        if v.published.len() != before {
            self.ctx.pool.save_volume(&v)?;
        }
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    fn validate(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        let id = req.checked()?;
        let v = self.ctx.pool.ready_volume(&id)?;
        if let Err(e) = params::create_params(&req.parameters, &req.mutable_parameters) {
            return Ok(unconfirmed(e.to_string()));
        }
        if let Some(why) = req
            .volume_capabilities
            .iter()
            .find_map(|c| convert::fits(&v, c))
        {
            return Ok(unconfirmed(why));
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    fn volume_status(&self, v: &VolumeRecord) -> (Vec<String>, csi::VolumeCondition) {
        let image = self.ctx.pool.volume_image(&v.id);
        let condition = if image.exists() {
            csi::VolumeCondition {
                abnormal: false,
                message: "volume image present in the pool".into(),
            }
        } else {
            csi::VolumeCondition {
                abnormal: true,
                message: format!("volume image {} is missing from the pool", image.display()),
            }
        };
        (v.published.keys().cloned().collect(), condition)
    }

    fn list_volumes(&self, req: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse> {
        let ready: Vec<VolumeRecord> = self
            .ctx
            .pool
            .volumes()?
            .into_iter()
            .filter(|v| v.state == crate::storage::RecordState::Ready)
            .collect();
        let (page, next_token) = convert::paginate(
            ready,
            req.max_entries,
            &req.starting_token,
            |t| VolumeId::parse(t).is_some(),
            |v| v.id.as_str(),
        )?;
        let entries = page
            .iter()
            .map(|v| {
                let (published_node_ids, condition) = self.volume_status(v);
                csi::list_volumes_response::Entry {
                    volume: Some(convert::to_volume(v, self.node_id())),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids,
                        volume_condition: Some(condition),
                    }),
                }
            })
            .collect();
        Ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    fn get_volume(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse> {
        let id = convert::existing_volume_id(&req.volume_id)?;
        let v = self.ctx.pool.ready_volume(&id)?;
        let (published_node_ids, condition) = self.volume_status(&v);
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(convert::to_volume(&v, self.node_id())),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(condition),
            }),
        })
    }

    fn get_capacity(&self, req: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse> {
        let p = params::create_params(&req.parameters, &HashMap::new())?;
        for c in &req.volume_capabilities {
            convert::well_formed(c)?;
        }
        let here = req.accessible_topology.as_ref().is_none_or(|t| {
            t.segments
                .get(super::TOPOLOGY_KEY)
                .is_none_or(|n| n == self.node_id())
        });
        let serviceable = req
            .volume_capabilities
            .iter()
            .all(|c| convert::unsupported(c).is_none());
        if !here || !serviceable {
            return Ok(csi::GetCapacityResponse::default());
        }
        let cap = self.ctx.pool.capacity()?;
        let min = match convert::volume_kind(&req.volume_capabilities, &p) {
            Ok(crate::storage::VolumeKind::Filesystem { fs_type }) => fs_type.min_bytes(),
            _ => crate::storage::pool::ALIGN,
        };
        Ok(csi::GetCapacityResponse {
            available_capacity: cap.available_bytes as i64,
            maximum_volume_size: Some(cap.available_bytes as i64),
            minimum_volume_size: Some(min as i64),
        })
    }

    async fn create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse> {
        let source = req.checked()?;
        let name = req.name.as_str();
        let id = SnapshotId::for_name(name);
        let _guard = self
            .ctx
            .inflight
            .try_lock([id.to_string(), source.to_string()])?;
        let pool = &self.ctx.pool;
        let rec = match pool.begin_snapshot(name, &source, None).await? {
            Err(existing) => existing,
            Ok(rec) => {
                // A single snapshot is crash-consistent without a freeze: the loop device
                // uses direct I/O, so every acknowledged write is in the image, and the
                // reflink is atomic with respect to writes to that one file.
                let method = pool.copy_snapshot(&rec).await?;
                tracing::debug!(?method, "snapshot copied");
                pool.finish_snapshot(rec)?
            }
        };
        Ok(csi::CreateSnapshotResponse {
            snapshot: Some(convert::to_snapshot(&rec)),
        })
    }

    fn delete_snapshot(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse> {
        let Some(id) = convert::snapshot_id(&req.snapshot_id)? else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        let Some(s) = self.ctx.pool.snapshot(&id)? else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        // A shipping snapshot is berth's own (a replica's base, a hand-off's final copy),
        // never a CSI snapshot: to the CO it does not exist, and deleting what does not
        // exist is success. It is left alone.
        if s.shipping {
            return Ok(csi::DeleteSnapshotResponse {});
        }
        if let Some(g) = &s.group
            && self.ctx.pool.group(g)?.is_some()
        {
            return Err(Error::invalid(
                "snapshot_id",
                format!("snapshot {id} belongs to group snapshot {g}; delete the group instead"),
            ));
        }
        self.ctx.pool.delete_snapshot(&id)?;
        Ok(csi::DeleteSnapshotResponse {})
    }

    fn list_snapshots(&self, req: csi::ListSnapshotsRequest) -> Result<csi::ListSnapshotsResponse> {
        let mut snaps: Vec<_> = self
            .ctx
            .pool
            .snapshots()?
            .into_iter()
            .filter(|s| s.state == crate::storage::RecordState::Ready && !s.shipping)
            .collect();
        if !req.snapshot_id.is_empty() {
            snaps.retain(|s| s.id.as_str() == req.snapshot_id);
        }
        if !req.source_volume_id.is_empty() {
            snaps.retain(|s| s.source_volume.as_str() == req.source_volume_id);
        }
        let (page, next_token) = convert::paginate(
            snaps,
            req.max_entries,
            &req.starting_token,
            |t| SnapshotId::parse(t).is_some(),
            |s| s.id.as_str(),
        )?;
        Ok(csi::ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(convert::to_snapshot(s)),
                })
                .collect(),
            next_token,
        })
    }

    fn get_snapshot(&self, req: csi::GetSnapshotRequest) -> Result<csi::GetSnapshotResponse> {
        let id = convert::snapshot_id(&req.snapshot_id)?
            .ok_or_else(|| Error::SnapshotNotFound(req.snapshot_id.clone()))?;
        let s = self.ctx.pool.ready_snapshot(&id)?;
        Ok(csi::GetSnapshotResponse {
            snapshot: Some(convert::to_snapshot(&s)),
        })
    }

    async fn expand(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        let (id, required_bytes, limit_bytes) = convert::expand_request(&req)?;
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        let current = self.ctx.pool.ready_volume(&id)?;
        if let Some(cap) = &req.volume_capability
            && let Some(why) = convert::fits(&current, cap)
        {
            return Err(Error::invalid("volume_capability", why));
        }
        // Spec (CapacityRange): 0 is "unspecified". Without required_bytes the current size
        // already satisfies the range, so nothing grows; CreateVolume's default size (1 GiB)
        // is not an expansion target.
        let required_bytes = if required_bytes == 0 {
            current.capacity_bytes
        } else {
            required_bytes
        };
        let v = self
            .ctx
            .pool
            .expand_volume(&id, required_bytes, limit_bytes)
            .await?;
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: v.capacity_bytes as i64,
            node_expansion_required: matches!(
                v.kind,
                crate::storage::VolumeKind::Filesystem { .. }
            ),
        })
    }

    async fn modify(
        &self,
        req: csi::ControllerModifyVolumeRequest,
    ) -> Result<csi::ControllerModifyVolumeResponse> {
        let id = req.checked()?;
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        let v = self.ctx.pool.ready_volume(&id)?;
        // Parsed in full before anything is applied: the spec forbids a partial change.
        let settings = params::modify_params(&v.settings, &req.mutable_parameters)?;
        self.ctx.pool.modify_volume(&id, settings).await?;
        Ok(csi::ControllerModifyVolumeResponse {})
    }
}

fn publish_response() -> csi::ControllerPublishVolumeResponse {
    csi::ControllerPublishVolumeResponse {
        publish_context: HashMap::new(),
    }
}

fn unconfirmed(message: String) -> csi::ValidateVolumeCapabilitiesResponse {
    csi::ValidateVolumeCapabilitiesResponse {
        confirmed: None,
        message,
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        respond(ControllerService::create_volume(self, req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        respond(ControllerService::delete_volume(self, req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, node.id = %req.get_ref().node_id))]
    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        respond(self.publish(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, node.id = %req.get_ref().node_id))]
    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        respond(self.unpublish(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        respond(self.validate(req.into_inner()))
    }

    #[tracing::instrument(skip_all)]
    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        respond(ControllerService::list_volumes(self, req.into_inner()))
    }

    #[tracing::instrument(skip_all)]
    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        respond(ControllerService::get_capacity(self, req.into_inner()))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities::controller_response()))
    }

    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name, volume.id = %req.get_ref().source_volume_id))]
    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        respond(ControllerService::create_snapshot(self, req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(snapshot.id = %req.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        respond(ControllerService::delete_snapshot(self, req.into_inner()))
    }

    #[tracing::instrument(skip_all)]
    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        respond(ControllerService::list_snapshots(self, req.into_inner()))
    }

    #[tracing::instrument(skip_all, fields(snapshot.id = %req.get_ref().snapshot_id))]
    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        respond(ControllerService::get_snapshot(self, req.into_inner()))
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        respond(self.expand(req.into_inner()).await)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        respond(self.get_volume(req.into_inner()))
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn controller_modify_volume(
        &self,
        req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        respond(self.modify(req.into_inner()).await)
    }
}

#[cfg(test)]
mod tests {
    use csi::{
        volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode},
        volume_content_source::{SnapshotSource, Type},
    };

    use super::*;
    use crate::storage::MIB;

    fn cap(block: bool) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: "ext4".into(),
                    ..Default::default()
                })
            }),
            access_mode: Some(AccessMode {
                mode: access_mode::Mode::SingleNodeWriter as i32,
            }),
        }
    }

    fn create(name: &str, block: bool, snapshot: Option<&str>) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 16 * MIB as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap(block)],
            volume_content_source: snapshot.map(|s| csi::VolumeContentSource {
                r#type: Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: s.into(),
                })),
            }),
            ..Default::default()
        }
    }

    async fn snapshot(svc: &ControllerService, name: &str, vol: &str) -> String {
        svc.create_snapshot(csi::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: vol.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .snapshot
        .unwrap()
        .snapshot_id
    }

    fn delete_snapshot(svc: &ControllerService, id: &str) -> Result<csi::DeleteSnapshotResponse> {
        svc.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        })
    }

    /// DeleteSnapshot deletes CSI snapshots only: a shipping snapshot's id names nothing
    /// the CO made, so it is answered as one that does not exist (OK) and left in place
    /// (issue 11, item 10).
    #[tokio::test(flavor = "multi_thread")]
    async fn delete_snapshot_leaves_shipping_snapshots_alone() {
        let dir = tempfile::tempdir().unwrap();
        let svc = ControllerService::new(super::super::test_context(dir.path()).await);
        let pool = svc.ctx.pool.clone();
        let vol = svc
            .create_volume(create("ship-src", true, None))
            .await
            .unwrap()
            .volume
            .unwrap()
            .volume_id;
        let vol = VolumeId::parse(&vol).unwrap();
        let shipping = pool.cut_shipping_snapshot(&vol, &[]).await.unwrap();
        for _ in 0..2 {
            delete_snapshot(&svc, shipping.id.as_str()).expect("not a CSI snapshot: OK");
        }
        assert!(
            pool.snapshot(&shipping.id).unwrap().is_some(),
            "the shipping snapshot is still there"
        );
        assert!(pool.snapshot_image(&shipping.id).exists());

        let csi_snap = snapshot(&svc, "csi-snap", vol.as_str()).await;
        delete_snapshot(&svc, &csi_snap).unwrap();
        let csi_snap = SnapshotId::parse(&csi_snap).unwrap();
        assert!(
            pool.snapshot(&csi_snap).unwrap().is_none(),
            "a CSI snapshot is deleted"
        );
    }

    /// A block volume's snapshot restores as a block volume only, also once its source is
    /// deleted: the snapshot record keeps the kind (issue 11, item 10). A record written
    /// before it did falls back to the source's kind, and with the source gone accepts.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_block_snapshot_restores_as_block_after_its_source_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let svc = ControllerService::new(super::super::test_context(dir.path()).await);
        let pool = svc.ctx.pool.clone();
        let src = svc
            .create_volume(create("block-src", true, None))
            .await
            .unwrap()
            .volume
            .unwrap()
            .volume_id;
        let snap = snapshot(&svc, "block-snap", &src).await;
        let legacy = snapshot(&svc, "legacy-snap", &src).await;
        svc.delete_volume(csi::DeleteVolumeRequest {
            volume_id: src.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

        let err = svc
            .create_volume(create("as-fs", false, Some(&snap)))
            .await
            .expect_err("a block snapshot restored as a filesystem");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        svc.create_volume(create("as-block", true, Some(&snap)))
            .await
            .expect("a block snapshot restores as block");

        // A record from before the kind was kept, its source gone: nothing tells.
        let id = SnapshotId::parse(&legacy).unwrap();
        let mut rec = pool.snapshot(&id).unwrap().unwrap();
        rec.kind = None;
        let meta = pool
            .root()
            .join("berth/snapshots")
            .join(format!("{id}.json"));
        crate::util::fsutil::write_json(&meta, &rec).unwrap();
        svc.create_volume(create("legacy-as-fs", false, Some(&legacy)))
            .await
            .expect("an old record without a kind is accepted");
    }
}
