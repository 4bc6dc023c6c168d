//! CSI Controller and GroupController for a cluster: each call goes to the node holding the
//! data, where the node's own controller (the same code as a single-node berth) decides the
//! answer. This layer adds placement, topology across the domain, listings merged over
//! nodes, and moving a volume when it is published on a node that does not hold it.

use std::{collections::HashMap, sync::Arc};

use futures::future::join_all;
use tonic::{Request, Response, Status};

use super::{
    Cluster, Placement,
    moves::{Moves, lag_report},
    peer,
};
use crate::{
    error::{Error, Result},
    proto::{
        agent::v1 as pb,
        csi::v1::{
            self as csi, controller_server::Controller, group_controller_server::GroupController,
        },
    },
    service::{
        DOMAIN_KEY, TOPOLOGY_KEY, capabilities,
        convert::{self, Shape},
        respond,
    },
    storage::{GroupSnapshotId, SnapshotId, VolumeId, VolumeSource},
};

#[derive(Debug, Clone)]
pub struct ClusterController {
    cluster: Arc<Cluster>,
    moves: Arc<Moves>,
}

impl ClusterController {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self {
            cluster,
            moves: Arc::default(),
        }
    }

    fn domain_topology(&self) -> csi::Topology {
        csi::Topology {
            segments: HashMap::from([(DOMAIN_KEY.to_string(), self.cluster.domain.clone())]),
        }
    }

    /// A volume as the cluster shows it: accessible from the whole domain.
    fn cluster_volume(&self, mut v: csi::Volume) -> csi::Volume {
        v.accessible_topology = vec![self.domain_topology()];
        v
    }

    /// The node holding the writable copy of `vol`.
    async fn primary_of(&self, vol: &VolumeId) -> Result<(String, Placement)> {
        let p = self.cluster.locate(vol).await?;
        match p.holder() {
            Some(c) => Ok((c.node.clone(), p)),
            None => Err(Error::VolumeNotFound(vol.to_string())),
        }
    }

    /// Whether the request's requisite topology admits `node` of this domain.
    fn allowed(&self, req: &csi::CreateVolumeRequest, node: &str) -> bool {
        let Some(t) = req.accessibility_requirements.as_ref() else {
            return true;
        };
        t.requisite.is_empty()
            || t.requisite.iter().any(|seg| {
                seg.segments.get(TOPOLOGY_KEY).is_none_or(|n| n == node)
                    && seg
                        .segments
                        .get(DOMAIN_KEY)
                        .is_none_or(|d| d == &self.cluster.domain)
            })
    }

    /// Where a new volume goes: the node the scheduler picked (first preferred segment
    /// naming a node), else the allowed node with the most free space.
    fn place(
        &self,
        req: &csi::CreateVolumeRequest,
        invs: &[(String, Result<pb::InventoryResponse>)],
    ) -> Result<String> {
        let topo = req.accessibility_requirements.as_ref();
        let allowed = |node: &str| self.allowed(req, node);
        if let Some(t) = topo {
            for seg in &t.preferred {
                if let Some(n) = seg.segments.get(TOPOLOGY_KEY)
                    && self.cluster.member(n).is_ok()
                    && allowed(n)
                {
                    return Ok(n.clone());
                }
            }
        }
        invs.iter()
            .filter_map(|(n, i)| i.as_ref().ok().map(|i| (i.available_bytes, n)))
            .filter(|(_, n)| allowed(n))
            .max()
            .map(|(_, n)| n.clone())
            .ok_or_else(|| {
                Error::TopologyUnsatisfiable(format!("any of {:?}", self.cluster.node_ids()))
            })
    }

    async fn create_volume(
        &self,
        mut req: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse> {
        let name = convert::name(&req.name)?.to_string();
        let id = VolumeId::for_name(&name);
        let _g = self.cluster.inflight.try_lock([id.to_string()])?;
        // One inventory round serves the lookup, the placement and the snapshot's holder.
        let invs = self.cluster.inventories().await;
        let existing = Placement::of(&id, &invs)?;
        let source = convert::content_source(req.volume_content_source.as_ref())?;
        // A clone is made on the node holding its source, so that node is the placement
        // (when the topology allows it), not the one with the most free space.
        let clone_of = match &source {
            Some(VolumeSource::Volume(src)) => Some(
                Placement::of(src, &invs)?
                    .holder()
                    .map(|c| c.node.clone())
                    .ok_or_else(|| Error::VolumeNotFound(src.to_string()))?,
            ),
            _ => None,
        };
        let node = match (existing.holder(), &clone_of) {
            // A retry, or a same-name request with other parameters: the holder decides.
            (Some(c), _) => c.node.clone(),
            (None, Some(holder)) => {
                if !self.allowed(&req, holder) {
                    return Err(Error::TopologyUnsatisfiable(format!(
                        "{holder} (a clone is made on the node holding its source)"
                    )));
                }
                holder.clone()
            }
            (None, None) => self.place(&req, &invs)?,
        };
        // A restore from a snapshot another node holds: bring the snapshot here first.
        if let Some(VolumeSource::Snapshot(s)) = &source {
            self.bring_snapshot(s.as_str(), &node, &invs).await?;
        }
        // Placement is decided: the node checks the request against itself only.
        req.accessibility_requirements = None;
        let resp = self
            .on_node(
                &node,
                req,
                |mut c, r| async move { c.create_volume(r).await },
            )
            .await?;
        tracing::info!(volume.id = %id, node, "volume placed");
        Ok(csi::CreateVolumeResponse {
            volume: resp.volume.map(|v| self.cluster_volume(v)),
        })
    }

    /// Ships a CSI snapshot to `node` if it does not hold it yet.
    async fn bring_snapshot(
        &self,
        snapshot_id: &str,
        node: &str,
        invs: &[(String, Result<pb::InventoryResponse>)],
    ) -> Result<()> {
        let Some(id) = convert::snapshot_id(snapshot_id)? else {
            return Err(Error::SnapshotNotFound(snapshot_id.to_string()));
        };
        let holders: Vec<(&String, &pb::SnapshotCopy)> = invs
            .iter()
            .filter_map(|(n, i)| {
                let i = i.as_ref().ok()?;
                i.snapshots
                    .iter()
                    .find(|s| s.snapshot_id == id.as_str())
                    .map(|s| (n, s))
            })
            .collect();
        if holders.iter().any(|(n, _)| n.as_str() == node) {
            return Ok(());
        }
        let Some((from, copy)) = holders.first() else {
            if invs.iter().any(|(_, i)| i.is_err()) {
                return Err(Error::Unreachable {
                    node: "some nodes".into(),
                    reason: format!("snapshot {id} was not found on the nodes that answered"),
                });
            }
            return Err(Error::SnapshotNotFound(id.to_string()));
        };
        tracing::info!(snapshot.id = %id, from = %from, to = node, "shipping a snapshot to restore it there");
        let source = self.cluster.member(from)?;
        let mut stream = self
            .cluster
            .agent(node)?
            .fetch(pb::FetchRequest {
                volume_id: copy.source_volume_id.clone(),
                snapshot_id: id.to_string(),
                kind: pb::SnapshotKind::Csi as i32,
                base_snapshot_id: String::new(),
                source_node_id: from.to_string(),
                source_address: source.address.clone(),
                epoch: 0,
                template: None,
                grant: Some(self.cluster.grant(pb::GrantBody {
                    snapshot_id: id.to_string(),
                    kind: pb::SnapshotKind::Csi as i32,
                    base_snapshot_id: String::new(),
                    source_node_id: from.to_string(),
                    receiver_node_id: node.to_string(),
                    expires_unix_seconds: 0,
                })?),
            })
            .await
            .map_err(|s| peer(node, s))?
            .into_inner();
        while let Some(p) = stream.message().await.map_err(|s| peer(node, s))? {
            if p.done {
                return Ok(());
            }
        }
        Err(Error::Unreachable {
            node: node.to_string(),
            reason: format!("fetch of snapshot {id} ended early"),
        })
    }

    async fn delete_volume(
        &self,
        req: csi::DeleteVolumeRequest,
    ) -> Result<csi::DeleteVolumeResponse> {
        let Some(id) = convert::volume_id(&req.volume_id)? else {
            return Ok(csi::DeleteVolumeResponse {});
        };
        let _g = self.cluster.inflight.try_lock([id.to_string()])?;
        let p = self.cluster.locate(&id).await?;
        if !p.unreachable.is_empty() {
            // Deleting what we can see would leave a copy to resurface when the node
            // returns.
            return Err(Error::Unreachable {
                node: p.unreachable.join(", "),
                reason: format!("cannot confirm every copy of {id} is deleted"),
            });
        }
        // The writable copy first: once it is gone the volume is gone, whatever else
        // remains to tidy.
        for c in p.primary.iter().chain(&p.fenced).chain(&p.stale) {
            self.cluster
                .csi(&c.node)?
                .delete_volume(req.clone())
                .await
                .map_err(|s| peer(&c.node, s))?;
        }
        // Every member forgets, not only those holding something: a receive of the volume
        // may be under way anywhere, and a cancelled hand-off left an epoch floor on every
        // node, which must not outlive the volume (a volume made again under the same name
        // has the same id). The senders first: a receive whose sender's snapshot went stops
        // without a record (`transfer::send`).
        let mut nodes: Vec<String> = p
            .primary
            .iter()
            .chain(&p.fenced)
            .chain(&p.stale)
            .map(|c| c.node.clone())
            .collect();
        nodes.extend(self.cluster.node_ids());
        let mut seen = std::collections::HashSet::new();
        nodes.retain(|n| seen.insert(n.clone()));
        for node in nodes {
            self.cluster
                .agent(&node)?
                .forget(pb::ForgetRequest {
                    volume_id: id.to_string(),
                })
                .await
                .map_err(|s| peer(&node, s))?;
        }
        Ok(csi::DeleteVolumeResponse {})
    }

    async fn publish(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse> {
        // Spec "Error Scheme": a missing field is INVALID_ARGUMENT before any lookup.
        convert::required(&req.volume_id, "volume_id")?;
        let node = convert::required(&req.node_id, "node_id")?.to_string();
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or(Error::Missing("volume_capability"))?;
        convert::well_formed(cap)?;
        let id = convert::existing_volume_id(&req.volume_id)?;
        self.cluster.member(&node)?;
        let p = self.cluster.locate(&id).await?;
        if p.is_empty() {
            return Err(Error::VolumeNotFound(id.to_string()));
        }
        let here = p.primary.as_ref().is_some_and(|c| c.node == node);
        if !here {
            if let Some(c) = &p.primary
                && let Some(other) = c.info.published_node_ids.first()
            {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is published to node {other}; unpublish it there before it can move to {node}"
                )));
            }
            tracing::info!(volume.id = %id, to = %node, "publish on a node without the data: moving the volume");
            self.moves
                .run(self.cluster.clone(), id.clone(), node.clone())
                .await?;
        } else if !p.fenced.is_empty() {
            // Tidy an earlier hand-off to here whose old copy was not settled.
            self.moves
                .run(self.cluster.clone(), id.clone(), node.clone())
                .await?;
        }
        self.on_node(&node, req, |mut c, r| async move {
            c.controller_publish_volume(r).await
        })
        .await
    }

    async fn unpublish(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse> {
        let Some(id) = convert::volume_id(&req.volume_id)? else {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        };
        let p = self.cluster.locate(&id).await?;
        // A silent node may hold the copy that records the publish; answering OK without
        // it would let a later publish elsewhere move a volume still in use there.
        p.require_all(&id)?;
        for c in p.primary.iter().chain(&p.fenced).chain(&p.stale) {
            self.cluster
                .csi(&c.node)?
                .controller_unpublish_volume(req.clone())
                .await
                .map_err(|s| peer(&c.node, s))?;
        }
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    async fn on_primary<Req, Resp, F, Fut>(&self, req: Req, call: F) -> Result<Resp>
    where
        Req: Shape,
        F: FnOnce(
            crate::proto::csi::v1::controller_client::ControllerClient<crate::metrics::AgentChannel>,
            Req,
        ) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let id = req.checked()?;
        let (node, _) = self.primary_of(&id).await?;
        self.on_node(&node, req, call).await
    }

    /// Forwards `req` to `node`'s controller; its error is that node's.
    async fn on_node<Req, Resp, F, Fut>(&self, node: &str, req: Req, call: F) -> Result<Resp>
    where
        F: FnOnce(
            crate::proto::csi::v1::controller_client::ControllerClient<crate::metrics::AgentChannel>,
            Req,
        ) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        Ok(call(self.cluster.csi(node)?, req)
            .await
            .map_err(|s| peer(node, s))?
            .into_inner())
    }

    async fn list_volumes(&self, req: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse> {
        let invs = self.cluster.inventories().await;
        // The node whose copy is authoritative for each volume.
        let mut owner: HashMap<String, (u64, String)> = HashMap::new();
        for (n, inv) in &invs {
            let inv = inv.as_ref().map_err(|e| Error::Unreachable {
                node: n.clone(),
                reason: e.to_string(),
            })?;
            for c in &inv.volumes {
                let rank = match pb::Role::try_from(c.role) {
                    Ok(pb::Role::Primary) => c.epoch * 2 + 1,
                    Ok(pb::Role::Fenced) => c.epoch * 2,
                    _ => continue,
                };
                let e = owner.entry(c.volume_id.clone()).or_insert((0, n.clone()));
                if rank >= e.0 {
                    *e = (rank, n.clone());
                }
            }
        }
        let lists = join_all(self.cluster.node_ids().into_iter().map(|n| async move {
            let r = match self.cluster.csi(&n) {
                Ok(mut c) => c
                    .list_volumes(csi::ListVolumesRequest::default())
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| peer(&n, s)),
                Err(e) => Err(e),
            };
            (n, r)
        }))
        .await;
        let mut entries = Vec::new();
        for (n, list) in lists {
            for e in list?.entries {
                let Some(v) = &e.volume else { continue };
                if owner.get(&v.volume_id).is_some_and(|(_, o)| o == &n) {
                    entries.push(csi::list_volumes_response::Entry {
                        volume: e.volume.map(|v| self.cluster_volume(v)),
                        status: e.status,
                    });
                }
            }
        }
        entries.sort_by(|a, b| {
            let id = |e: &csi::list_volumes_response::Entry| {
                e.volume
                    .as_ref()
                    .map(|v| v.volume_id.clone())
                    .unwrap_or_default()
            };
            id(a).cmp(&id(b))
        });
        let (page, next_token) = convert::paginate(
            entries,
            req.max_entries,
            &req.starting_token,
            |t| VolumeId::parse(t).is_some(),
            |e| {
                e.volume
                    .as_ref()
                    .map(|v| v.volume_id.as_str())
                    .unwrap_or_default()
            },
        )?;
        Ok(csi::ListVolumesResponse {
            entries: page,
            next_token,
        })
    }

    async fn get_capacity(&self, req: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse> {
        let segments = req.accessible_topology.as_ref().map(|t| &t.segments);
        let segment = |key: &str| segments.and_then(|s| s.get(key));
        // Another domain's nodes are not this controller's: nothing fits there.
        if segment(DOMAIN_KEY).is_some_and(|d| d != &self.cluster.domain) {
            return Ok(csi::GetCapacityResponse::default());
        }
        let nodes: Vec<String> = match segment(TOPOLOGY_KEY) {
            Some(n) => {
                if self.cluster.member(n).is_err() {
                    return Ok(csi::GetCapacityResponse::default());
                }
                vec![n.clone()]
            }
            None => self.cluster.node_ids(),
        };
        let mut fwd = req.clone();
        fwd.accessible_topology = None;
        let answers = join_all(nodes.iter().map(|n| {
            let fwd = fwd.clone();
            async move {
                match self.cluster.csi(n) {
                    Ok(mut c) => c
                        .get_capacity(fwd)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| peer(n, s)),
                    Err(e) => Err(e),
                }
            }
        }))
        .await;
        // A volume must fit on one node: the answer is the largest any node that answers
        // can take. A silent node takes nothing now; only when none answers is the
        // capacity unknown.
        let mut best: Option<csi::GetCapacityResponse> = None;
        let mut silent = None;
        for a in answers {
            match a {
                Ok(a) => {
                    if best
                        .as_ref()
                        .is_none_or(|b| a.available_capacity > b.available_capacity)
                    {
                        best = Some(a);
                    }
                }
                Err(e) => silent = Some(e),
            }
        }
        match (best, silent) {
            (Some(best), _) => Ok(best),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(csi::GetCapacityResponse::default()),
        }
    }

    async fn create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse> {
        let source = req.checked()?;
        let sid = SnapshotId::for_name(&req.name);
        // A retry finds the snapshot where it was made, even if the volume moved since.
        let invs = self.cluster.inventories().await;
        if let Some((n, _)) = invs.iter().find(|(_, i)| {
            i.as_ref()
                .is_ok_and(|i| i.snapshots.iter().any(|s| s.snapshot_id == sid.as_str()))
        }) {
            return Ok(self
                .cluster
                .csi(n)?
                .create_snapshot(req)
                .await
                .map_err(|s| peer(n, s))?
                .into_inner());
        }
        // Not found, but a silent node may hold it: cutting a second snapshot under the same
        // id elsewhere would answer a retry with other data.
        if let Some((n, Err(e))) = invs.iter().find(|(_, i)| i.is_err()) {
            return Err(Error::Unreachable {
                node: n.clone(),
                reason: format!("snapshot {sid} may be on it: {e}"),
            });
        }
        // Every node answered: the same inventories say where the source is.
        let node = Placement::of(&source, &invs)?
            .holder()
            .map(|c| c.node.clone())
            .ok_or_else(|| Error::VolumeNotFound(source.to_string()))?;
        self.on_node(
            &node,
            req,
            |mut c, r| async move { c.create_snapshot(r).await },
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse> {
        if convert::snapshot_id(&req.snapshot_id)?.is_none() {
            return Ok(csi::DeleteSnapshotResponse {});
        }
        for n in &self.cluster.node_ids() {
            self.cluster
                .csi(n)?
                .delete_snapshot(req.clone())
                .await
                .map_err(|s| peer(n, s))?;
        }
        Ok(csi::DeleteSnapshotResponse {})
    }

    async fn list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse> {
        let mut fwd = req.clone();
        fwd.max_entries = 0;
        fwd.starting_token = String::new();
        let mut entries: Vec<csi::list_snapshots_response::Entry> = Vec::new();
        for n in &self.cluster.node_ids() {
            let r = self
                .cluster
                .csi(n)?
                .list_snapshots(fwd.clone())
                .await
                .map_err(|s| peer(n, s))?
                .into_inner();
            entries.extend(r.entries);
        }
        let id = |e: &csi::list_snapshots_response::Entry| {
            e.snapshot
                .as_ref()
                .map(|s| s.snapshot_id.clone())
                .unwrap_or_default()
        };
        entries.sort_by_key(id);
        entries.dedup_by_key(|e| id(e));
        let (page, next_token) = convert::paginate(
            entries,
            req.max_entries,
            &req.starting_token,
            |t| SnapshotId::parse(t).is_some(),
            |e| {
                e.snapshot
                    .as_ref()
                    .map(|s| s.snapshot_id.as_str())
                    .unwrap_or_default()
            },
        )?;
        Ok(csi::ListSnapshotsResponse {
            entries: page,
            next_token,
        })
    }

    async fn get_volume(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse> {
        let id = convert::existing_volume_id(&req.volume_id)?;
        let (node, p) = self.primary_of(&id).await?;
        let mut resp = self
            .on_node(&node, req, |mut c, r| async move {
                c.controller_get_volume(r).await
            })
            .await?;
        resp.volume = resp.volume.map(|v| self.cluster_volume(v));
        let wanted = p.primary.as_ref().map_or(1, |c| c.info.replicas);
        if let Some(lag) = lag_report(&p, wanted)
            && let Some(status) = resp.status.as_mut()
        {
            let cond = status.volume_condition.get_or_insert_with(Default::default);
            cond.message = if cond.message.is_empty() {
                lag
            } else {
                format!("{}; {lag}", cond.message)
            };
        }
        Ok(resp)
    }
}

#[tonic::async_trait]
impl Controller for ClusterController {
    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        let param = |k: &str| req.parameters.get(k).cloned();
        let pvc =
            param("csi.storage.k8s.io/pvc/namespace").zip(param("csi.storage.k8s.io/pvc/name"));
        let name = req.name.clone();
        let result = ClusterController::create_volume(self, req).await;
        if let Err(e) = &result
            && e.code() != tonic::Code::Aborted
        {
            self.cluster.pvc_event(
                pvc,
                "ProvisioningFailed",
                format!("berth could not provision volume {name}: {e}"),
                true,
            );
        }
        respond(result)
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        respond(ClusterController::delete_volume(self, req.into_inner()).await)
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

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        respond(
            self.on_primary(req.into_inner(), |mut c, r| async move {
                c.validate_volume_capabilities(r).await
            })
            .await,
        )
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        respond(ClusterController::list_volumes(self, req.into_inner()).await)
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        respond(ClusterController::get_capacity(self, req.into_inner()).await)
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
        respond(ClusterController::create_snapshot(self, req.into_inner()).await)
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        respond(ClusterController::delete_snapshot(self, req.into_inner()).await)
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        respond(ClusterController::list_snapshots(self, req.into_inner()).await)
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                if convert::snapshot_id(&req.snapshot_id)?.is_none() {
                    return Err(Error::SnapshotNotFound(req.snapshot_id.clone()));
                }
                let mut last = Err(Error::SnapshotNotFound(req.snapshot_id.clone()));
                for n in &self.cluster.node_ids() {
                    match self.cluster.csi(n)?.get_snapshot(req.clone()).await {
                        Ok(r) => return Ok(r.into_inner()),
                        Err(s) if s.code() == tonic::Code::NotFound => {}
                        Err(s) => last = Err(peer(n, s)),
                    }
                }
                last
            }
            .await,
        )
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        respond(
            self.on_primary(req.into_inner(), |mut c, r| async move {
                c.controller_expand_volume(r).await
            })
            .await,
        )
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        respond(self.get_volume(req.into_inner()).await)
    }

    async fn controller_modify_volume(
        &self,
        req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        respond(
            self.on_primary(req.into_inner(), |mut c, r| async move {
                c.controller_modify_volume(r).await
            })
            .await,
        )
    }
}

#[tonic::async_trait]
impl GroupController for ClusterController {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities::group_response()))
    }

    /// A group is cut by one node's freeze: its members must share a node.
    async fn create_volume_group_snapshot(
        &self,
        req: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                let mut node: Option<String> = None;
                for v in &req.source_volume_ids {
                    let id = convert::existing_volume_id(v)?;
                    let (n, _) = self.primary_of(&id).await?;
                    if node.as_ref().is_some_and(|m| m != &n) {
                        return Err(Error::FailedPrecondition(format!(
                            "the group's volumes live on different nodes ({} and {n}); a group snapshot is cut on one node",
                            node.unwrap_or_default()
                        )));
                    }
                    node = Some(n);
                }
                let Some(node) = node else {
                    return Err(Error::Missing("source_volume_ids"));
                };
                Ok(self
                    .cluster
                    .group(&node)?
                    .create_volume_group_snapshot(req)
                    .await
                    .map_err(|s| peer(&node, s))?
                    .into_inner())
            }
            .await,
        )
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                if convert::group_id(&req.group_snapshot_id)?.is_none() {
                    return Ok(csi::DeleteVolumeGroupSnapshotResponse {});
                }
                for n in &self.cluster.node_ids() {
                    self.cluster
                        .group(n)?
                        .delete_volume_group_snapshot(req.clone())
                        .await
                        .map_err(|s| peer(n, s))?;
                }
                Ok(csi::DeleteVolumeGroupSnapshotResponse {})
            }
            .await,
        )
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                let _: Option<GroupSnapshotId> = convert::group_id(&req.group_snapshot_id)?;
                let mut last = Err(Error::GroupSnapshotNotFound(req.group_snapshot_id.clone()));
                for n in &self.cluster.node_ids() {
                    match self
                        .cluster
                        .group(n)?
                        .get_volume_group_snapshot(req.clone())
                        .await
                    {
                        Ok(r) => return Ok(r.into_inner()),
                        Err(s) if s.code() == tonic::Code::NotFound => {}
                        Err(s) => last = Err(peer(n, s)),
                    }
                }
                last
            }
            .await,
        )
    }
}
