//! CSI Controller and GroupController for a cluster: each call goes to the node holding the
//! data, found in the volume's placement record, where the node's own controller (the same
//! code as a single-node berth) decides the answer. A call about one volume talks to that
//! volume's nodes only; listings are answered from the records. This layer adds placement,
//! topology across the domain, and moving a volume when it is published on a node that
//! does not hold it.

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
    placement::{self, PlacementPhase, SnapshotPlacement, Versioned, VolumePlacement},
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
        p.require_primary(vol)?;
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
    /// naming a node that answers), else the allowed node with the most free space, as the
    /// nodes last reported it (`monitor`): no node is asked, and a silent one is skipped.
    fn place(&self, req: &csi::CreateVolumeRequest) -> Result<String> {
        let allowed = |node: &str| self.allowed(req, node);
        if let Some(t) = req.accessibility_requirements.as_ref() {
            for seg in &t.preferred {
                if let Some(n) = seg.segments.get(TOPOLOGY_KEY)
                    && self.cluster.view(n).is_some()
                    && allowed(n)
                {
                    return Ok(n.clone());
                }
            }
        }
        self.cluster
            .answering()
            .into_iter()
            .map(|(n, i)| (i.available_bytes, n))
            .filter(|(_, n)| allowed(n))
            .max()
            .map(|(_, n)| n)
            .ok_or_else(|| {
                Error::TopologyUnsatisfiable(format!(
                    "any answering node of {:?}",
                    self.cluster.node_ids()
                ))
            })
    }

    /// The record of a volume that must exist (a clone's source, a snapshot's volume).
    async fn existing(&self, vol: &VolumeId) -> Result<Versioned> {
        match self.cluster.record(vol).await? {
            Some(r) if r.record.is_live() => Ok(r),
            _ => Err(Error::VolumeNotFound(vol.to_string())),
        }
    }

    async fn create_volume(
        &self,
        mut req: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse> {
        let name = convert::name(&req.name)?.to_string();
        let id = VolumeId::for_name(&name);
        let _g = self.cluster.inflight.try_lock([id.to_string()])?;
        let source = convert::content_source(req.volume_content_source.as_ref())?;
        // The record makes the name idempotent: a retry (or a same-name request with other
        // parameters, which the node refuses) goes where the first attempt went.
        let existing = self.cluster.record(&id).await?;
        let (node, version) = match existing {
            Some(r) if r.record.is_live() => {
                if let Some(reason) = self.cluster.reachable(&r.record.primary).await {
                    return Err(Error::Unreachable {
                        node: r.record.primary.clone(),
                        reason: format!("volume {id} is being made there: {reason}"),
                    });
                }
                (r.record.primary.clone(), r.version)
            }
            Some(r) if r.record.phase == PlacementPhase::Deleting => {
                // Display: "an operation on volume … (its delete) is already in progress".
                return Err(Error::Aborted(format!("volume {id} (its delete)")));
            }
            // No volume of the name (none ever, or one deleted whose snapshots remain).
            gone => {
                let node = self.placement_for(&req, source.as_ref()).await?;
                let param = |k: &str| req.parameters.get(k).cloned().unwrap_or_default();
                let claim = match (
                    param("csi.storage.k8s.io/pvc/namespace"),
                    param("csi.storage.k8s.io/pvc/name"),
                ) {
                    (ns, n) if !ns.is_empty() && !n.is_empty() => format!("{ns}/{n}"),
                    _ => String::new(),
                };
                let record = VolumePlacement {
                    volume_id: id.to_string(),
                    name: name.clone(),
                    phase: PlacementPhase::Creating,
                    primary: node.clone(),
                    capacity_bytes: req
                        .capacity_range
                        .as_ref()
                        .map_or(0, |c| c.required_bytes.max(0) as u64),
                    parameters: req.parameters.clone().into_iter().collect(),
                    claim,
                    snapshots: gone
                        .as_ref()
                        .map(|g| g.record.snapshots.clone())
                        .unwrap_or_default(),
                    ..Default::default()
                };
                // Two controllers placing one name: one record lands, the other retries.
                let written = match &gone {
                    Some(g) => self.cluster.store.replace(&record, &g.version).await?,
                    None => self.cluster.store.create(&record).await?,
                };
                (node, written.version)
            }
        };
        // A restore from a snapshot another node holds: bring the snapshot here first.
        if let Some(VolumeSource::Snapshot(s)) = &source {
            self.bring_snapshot(s, &node).await?;
        }
        // Placement is decided: the node checks the request against itself only.
        req.accessibility_requirements = None;
        let resp = match self
            .on_node(
                &node,
                req,
                |mut c, r| async move { c.create_volume(r).await },
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // The node refused for good (no room, other parameters, ...): the record
                // goes, so that the next attempt places again. An answer that may hide a
                // made volume (unreachable, a deadline) keeps it.
                let refused = matches!(
                    e.code(),
                    tonic::Code::ResourceExhausted
                        | tonic::Code::InvalidArgument
                        | tonic::Code::OutOfRange
                        | tonic::Code::NotFound
                        | tonic::Code::FailedPrecondition
                );
                if refused
                    && let Some(cur) = self.cluster.store.get(&id).await?
                    && cur.version == version
                    && cur.record.phase == PlacementPhase::Creating
                {
                    self.forget_failed_create(&id, cur).await?;
                }
                return Err(e);
            }
        };
        let capacity = resp
            .volume
            .as_ref()
            .map_or(0, |v| v.capacity_bytes.max(0) as u64);
        self.cluster
            .update_record(&id, |r| {
                if r.phase == PlacementPhase::Creating {
                    r.phase = PlacementPhase::Ready;
                }
                r.capacity_bytes = r.capacity_bytes.max(capacity);
            })
            .await?;
        self.cluster.repoll(&node);
        tracing::info!(volume.id = %id, node, "volume placed");
        Ok(csi::CreateVolumeResponse {
            volume: resp.volume.map(|v| self.cluster_volume(v)),
        })
    }

    /// Drops the record of a create the node refused: deleted, or back to the snapshots of
    /// an earlier volume of the name.
    async fn forget_failed_create(&self, id: &VolumeId, cur: Versioned) -> Result<()> {
        if cur.record.snapshots.is_empty() {
            return self.cluster.store.delete(id, &cur.version).await;
        }
        let mut r = cur.record;
        r.phase = PlacementPhase::Deleted;
        r.primary.clear();
        self.cluster
            .store
            .replace(&r, &cur.version)
            .await
            .map(|_| ())
    }

    /// The node a new volume goes to. A clone is made on the node holding its source, so
    /// that node is the placement (when the topology allows it), not the one with the most
    /// free space.
    async fn placement_for(
        &self,
        req: &csi::CreateVolumeRequest,
        source: Option<&VolumeSource>,
    ) -> Result<String> {
        let Some(VolumeSource::Volume(src)) = source else {
            return self.place(req);
        };
        let holder = self.existing(src).await?.record.primary;
        if !self.allowed(req, &holder) {
            return Err(Error::TopologyUnsatisfiable(format!(
                "{holder} (a clone is made on the node holding its source)"
            )));
        }
        if let Some(reason) = self.cluster.reachable(&holder).await {
            return Err(Error::Unreachable {
                node: holder,
                reason: format!("it holds the clone's source {src}: {reason}"),
            });
        }
        Ok(holder)
    }

    /// Ships a CSI snapshot to `node` if it does not hold it yet.
    async fn bring_snapshot(&self, id: &SnapshotId, node: &str) -> Result<()> {
        let (record, snap) = self.snapshot_holder(id).await?;
        if record
            .snapshots
            .iter()
            .any(|s| s.snapshot_id == id.as_str() && s.node == node)
        {
            return Ok(());
        }
        let from = &snap.node;
        if let Some(reason) = self.cluster.reachable(from).await {
            return Err(Error::Unreachable {
                node: from.clone(),
                reason: format!("it holds snapshot {id}: {reason}"),
            });
        }
        tracing::info!(snapshot.id = %id, from = %from, to = node, "shipping a snapshot to restore it there");
        let source = self.cluster.member(from)?;
        let mut stream = self
            .cluster
            .agent(node)?
            .fetch(pb::FetchRequest {
                volume_id: record.volume_id.clone(),
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
                // The copy is recorded where it is, so that deleting the snapshot
                // reaches it.
                let vol = record.id()?;
                let copy = SnapshotPlacement {
                    node: node.to_string(),
                    ..snap.clone()
                };
                self.cluster
                    .update_record(&vol, |r| {
                        if !r.snapshots.contains(&copy) {
                            r.snapshots.push(copy.clone());
                        }
                    })
                    .await?;
                return Ok(());
            }
        }
        Err(Error::Unreachable {
            node: node.to_string(),
            reason: format!("fetch of snapshot {id} ended early"),
        })
    }

    /// The record of the volume a CSI snapshot was cut from, and its entry there.
    async fn snapshot_holder(
        &self,
        id: &SnapshotId,
    ) -> Result<(VolumePlacement, SnapshotPlacement)> {
        match self.find_snapshot(id).await? {
            Some(found) => Ok(found),
            None => Err(Error::SnapshotNotFound(id.to_string())),
        }
    }

    /// Looks a snapshot up in the records. Not found while some node is not adopted yet is
    /// UNAVAILABLE: the snapshot may be there.
    async fn find_snapshot(
        &self,
        id: &SnapshotId,
    ) -> Result<Option<(VolumePlacement, SnapshotPlacement)>> {
        let found = placement::find_snapshot(self.cluster.store.as_ref(), id.as_str()).await?;
        if found.is_none() {
            self.cluster.known_absent(&format!("snapshot {id}"))?;
        }
        Ok(found.map(|v| {
            let snap = v
                .record
                .snapshots
                .iter()
                .find(|s| s.snapshot_id == id.as_str())
                .cloned()
                .unwrap_or_default();
            (v.record, snap)
        }))
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
        // No record, or one kept only for the snapshots of a deleted volume: already gone.
        if p.record
            .as_ref()
            .is_none_or(|r| r.record.phase == PlacementPhase::Deleted)
        {
            return Ok(csi::DeleteVolumeResponse {});
        }
        // Deleting what we can see would leave a copy to resurface when the node returns.
        // Checked before anything is recorded: a delete refused now leaves the volume as it
        // was, listed and reported on.
        p.require_all(&id)?;
        // Recorded before any copy goes: a create of the name waits for the delete to
        // finish, and a crash from here on resumes the delete, never brings the volume back.
        if let Some(cur) = p
            .record
            .as_ref()
            .filter(|c| c.record.phase != PlacementPhase::Deleting)
        {
            let mut r = cur.record.clone();
            r.phase = PlacementPhase::Deleting;
            self.cluster.store.replace(&r, &cur.version).await?;
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
        // Every node of the record forgets, not only those holding a copy now: a receive
        // of the volume may be under way on a replica's node or a hand-off's target, and a
        // cancelled hand-off left an epoch floor on each, which must not outlive the volume
        // (a volume made again under the same name has the same id). The senders first: a
        // receive whose sender's snapshot went stops without a record (`transfer::send`).
        let mut nodes: Vec<String> = p
            .primary
            .iter()
            .chain(&p.fenced)
            .chain(&p.stale)
            .map(|c| c.node.clone())
            .collect();
        nodes.extend(p.record.iter().flat_map(|r| r.record.nodes()));
        let mut seen = std::collections::HashSet::new();
        nodes.retain(|n| seen.insert(n.clone()));
        for node in &nodes {
            self.cluster
                .agent(node)?
                .forget(pb::ForgetRequest {
                    volume_id: id.to_string(),
                })
                .await
                .map_err(|s| peer(node, s))?;
        }
        // The record goes last; it stays, volume-less, while snapshots cut from it remain.
        let Some(cur) = self.cluster.store.get(&id).await? else {
            return Ok(csi::DeleteVolumeResponse {});
        };
        if cur.record.snapshots.is_empty() {
            self.cluster.store.delete(&id, &cur.version).await?;
        } else {
            let mut r = cur.record;
            r.phase = PlacementPhase::Deleted;
            r.primary.clear();
            r.replicas.clear();
            r.handoff = None;
            self.cluster.store.replace(&r, &cur.version).await?;
        }
        for node in &nodes {
            self.cluster.repoll(node);
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
        if let Some(reason) = self.cluster.reachable(&node).await {
            return Err(Error::Unreachable {
                node: node.clone(),
                reason: format!("volume {id} cannot be published there: {reason}"),
            });
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
        let resp = self
            .on_node(&node, req, |mut c, r| async move {
                c.controller_publish_volume(r).await
            })
            .await?;
        // ListVolumes reads publishes from the nodes' polls: show this one now.
        self.cluster.repoll(&node);
        Ok(resp)
    }

    async fn unpublish(
        &self,
        req: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse> {
        let Some(id) = convert::volume_id(&req.volume_id)? else {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        };
        let p = self.cluster.locate(&id).await?;
        // The primary's node holds the publish; answering OK without it would let a later
        // publish elsewhere move a volume still in use there. A silent replica holds none.
        p.require_primary(&id)?;
        for c in p.primary.iter().chain(&p.fenced).chain(&p.stale) {
            self.cluster
                .csi(&c.node)?
                .controller_unpublish_volume(req.clone())
                .await
                .map_err(|s| peer(&c.node, s))?;
            self.cluster.repoll(&c.node);
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

    /// Answered from the records, a page of the store per call: no node is asked. Each
    /// entry's publishes come from its primary's last poll (`monitor`); a volume with a copy
    /// on a silent node has an abnormal condition naming it.
    async fn list_volumes(&self, req: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse> {
        if req.max_entries < 0 {
            return Err(Error::invalid("max_entries", "must not be negative"));
        }
        // 0: every volume, read from the store a page at a time.
        let want = match req.max_entries {
            0 => usize::MAX,
            n => n as usize,
        };
        let mut next = (!req.starting_token.is_empty()).then(|| req.starting_token.clone());
        let mut entries = Vec::new();
        // Records that are not volumes (deleted ones keeping snapshots, the adoption marks)
        // are skipped, so a page may need more than one read of the store.
        loop {
            let room = (want - entries.len()).min(500);
            let page = self.cluster.store.list(next.as_deref(), room).await?;
            for r in page
                .records
                .iter()
                .map(|v| &v.record)
                .filter(|r| r.is_live())
            {
                entries.push(self.list_entry(r));
            }
            next = page.next;
            if next.is_none() || entries.len() >= want {
                break;
            }
        }
        Ok(csi::ListVolumesResponse {
            entries,
            next_token: next.unwrap_or_default(),
        })
    }

    /// One ListVolumes entry, from the record and the nodes' last polls.
    fn list_entry(&self, r: &VolumePlacement) -> csi::list_volumes_response::Entry {
        let published = self
            .cluster
            .view(&r.primary)
            .and_then(|inv| {
                inv.volumes
                    .iter()
                    .find(|c| c.volume_id == r.volume_id && c.role != pb::Role::Replica as i32)
                    .map(|c| c.published_node_ids.clone())
            })
            .unwrap_or_default();
        csi::list_volumes_response::Entry {
            volume: Some(csi::Volume {
                capacity_bytes: r.capacity_bytes.min(i64::MAX as u64) as i64,
                volume_id: r.volume_id.clone(),
                accessible_topology: vec![self.domain_topology()],
                ..Default::default()
            }),
            status: Some(csi::list_volumes_response::VolumeStatus {
                published_node_ids: published,
                volume_condition: Some(self.condition(r)),
            }),
        }
    }

    /// Abnormal while a node holding a copy of the volume is silent, naming it.
    fn condition(&self, r: &VolumePlacement) -> csi::VolumeCondition {
        let silent: Vec<String> = r
            .nodes()
            .into_iter()
            .filter_map(|n| {
                self.cluster
                    .silent(&n)
                    .map(|why| format!("node {n} holds a copy and is unreachable ({why})"))
            })
            .collect();
        csi::VolumeCondition {
            abnormal: !silent.is_empty(),
            message: silent.join("; "),
        }
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
            // A silent node takes nothing now, and asking it would wait out a timeout.
            None => self
                .cluster
                .node_ids()
                .into_iter()
                .filter(|n| self.cluster.silent(n).is_none())
                .collect(),
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
        // A retry goes where the snapshot was made, even if the volume moved since; a
        // snapshot of the name cut from another volume is refused by the node holding it.
        let node = match self.find_snapshot(&sid).await? {
            Some((_, snap)) => snap.node,
            None => {
                let (node, _) = self.primary_of(&source).await?;
                node
            }
        };
        let resp = self
            .on_node(
                &node,
                req,
                |mut c, r| async move { c.create_snapshot(r).await },
            )
            .await?;
        if let Some(snap) = &resp.snapshot {
            self.record_snapshots(&source, &node, std::slice::from_ref(snap), "")
                .await?;
        }
        Ok(resp)
    }

    /// Adds snapshots cut on `node` to `vol`'s record.
    async fn record_snapshots(
        &self,
        vol: &VolumeId,
        node: &str,
        snaps: &[csi::Snapshot],
        group: &str,
    ) -> Result<()> {
        self.cluster
            .update_record(vol, |r| {
                for s in snaps {
                    if r.snapshots.iter().any(|x| x.snapshot_id == s.snapshot_id) {
                        continue;
                    }
                    let t = s.creation_time.unwrap_or_default();
                    r.snapshots.push(SnapshotPlacement {
                        snapshot_id: s.snapshot_id.clone(),
                        node: node.to_string(),
                        size_bytes: s.size_bytes.max(0) as u64,
                        created_unix_nanos: t.seconds * 1_000_000_000 + i64::from(t.nanos),
                        group_snapshot_id: group.to_string(),
                    });
                }
            })
            .await
            .map(|_| ())
    }

    /// Removes snapshot `ids` from `vol`'s record; the record of a deleted volume goes
    /// with its last snapshot.
    async fn forget_snapshots(&self, vol: &str, ids: &[String]) -> Result<()> {
        let Some(vol) = VolumeId::parse(vol) else {
            return Ok(());
        };
        loop {
            let Some(cur) = self.cluster.store.get(&vol).await? else {
                return Ok(());
            };
            let mut r = cur.record.clone();
            r.snapshots.retain(|s| !ids.contains(&s.snapshot_id));
            let written = if r.snapshots.is_empty() && r.phase == PlacementPhase::Deleted {
                self.cluster.store.delete(&vol, &cur.version).await
            } else {
                self.cluster
                    .store
                    .replace(&r, &cur.version)
                    .await
                    .map(|_| ())
            };
            match written {
                Err(Error::Conflict { .. }) => continue,
                other => return other,
            }
        }
    }

    /// Fails naming `node` when it is silent: the call needs it.
    async fn answering(&self, node: &str, what: String) -> Result<()> {
        match self.cluster.reachable(node).await {
            None => Ok(()),
            Some(why) => Err(Error::Unreachable {
                node: node.to_string(),
                reason: format!("{what}: {why}"),
            }),
        }
    }

    async fn delete_snapshot(
        &self,
        req: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse> {
        let Some(id) = convert::snapshot_id(&req.snapshot_id)? else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        let Some((record, _)) = self.find_snapshot(&id).await? else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        let mut nodes: Vec<&String> = record
            .snapshots
            .iter()
            .filter(|s| s.snapshot_id == id.as_str())
            .map(|s| &s.node)
            .collect();
        nodes.sort();
        nodes.dedup();
        for node in &nodes {
            self.answering(node, format!("it holds a copy of snapshot {id}"))
                .await?;
        }
        for node in nodes {
            self.on_node(node, req.clone(), |mut c, r| async move {
                c.delete_snapshot(r).await
            })
            .await?;
        }
        self.forget_snapshots(&record.volume_id, &[id.to_string()])
            .await?;
        Ok(csi::DeleteSnapshotResponse {})
    }

    /// Answered from the records: no node is asked.
    async fn list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse> {
        let records = placement::all(self.cluster.store.as_ref()).await?;
        let mut entries: Vec<csi::list_snapshots_response::Entry> = records
            .iter()
            .map(|v| &v.record)
            .filter(|r| req.source_volume_id.is_empty() || r.volume_id == req.source_volume_id)
            .flat_map(|r| {
                r.snapshots
                    .iter()
                    .filter(|s| req.snapshot_id.is_empty() || s.snapshot_id == req.snapshot_id)
                    .map(|s| csi::list_snapshots_response::Entry {
                        snapshot: Some(csi::Snapshot {
                            size_bytes: s.size_bytes.min(i64::MAX as u64) as i64,
                            snapshot_id: s.snapshot_id.clone(),
                            source_volume_id: r.volume_id.clone(),
                            creation_time: Some(convert::timestamp(
                                s.created_unix_nanos.max(0) as u128
                            )),
                            ready_to_use: true,
                            group_snapshot_id: s.group_snapshot_id.clone(),
                        }),
                    })
            })
            .collect();
        let id = |e: &csi::list_snapshots_response::Entry| {
            e.snapshot
                .as_ref()
                .map(|s| s.snapshot_id.clone())
                .unwrap_or_default()
        };
        entries.sort_by_key(id);
        // A snapshot restored elsewhere has a copy on each node: listed once.
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

    async fn get_snapshot(&self, req: csi::GetSnapshotRequest) -> Result<csi::GetSnapshotResponse> {
        let Some(id) = convert::snapshot_id(&req.snapshot_id)? else {
            return Err(Error::SnapshotNotFound(req.snapshot_id.clone()));
        };
        let (_, snap) = self.snapshot_holder(&id).await?;
        self.answering(&snap.node, format!("it holds snapshot {id}"))
            .await?;
        self.on_node(&snap.node, req, |mut c, r| async move {
            c.get_snapshot(r).await
        })
        .await
    }

    async fn expand(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        let id = req.checked()?;
        let (node, _) = self.primary_of(&id).await?;
        let resp = self
            .on_node(&node, req, |mut c, r| async move {
                c.controller_expand_volume(r).await
            })
            .await?;
        let size = resp.capacity_bytes.max(0) as u64;
        self.cluster
            .update_record(&id, |r| {
                r.capacity_bytes = r.capacity_bytes.max(size);
            })
            .await?;
        Ok(resp)
    }

    async fn get_volume(
        &self,
        req: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse> {
        let id = convert::existing_volume_id(&req.volume_id)?;
        // The primary's node is silent: the record still knows the volume, and the
        // condition says why nothing else is known (the health monitor shows it).
        let from_record = |r: &VolumePlacement| {
            let mut entry = self.list_entry(r);
            csi::ControllerGetVolumeResponse {
                volume: entry.volume.take(),
                status: entry.status.take().map(|s| {
                    csi::controller_get_volume_response::VolumeStatus {
                        published_node_ids: s.published_node_ids,
                        volume_condition: s.volume_condition,
                    }
                }),
            }
        };
        let p = match self.cluster.locate(&id).await {
            Ok(p) => p,
            Err(e @ Error::Unreachable { .. }) => {
                return match self.cluster.store.get(&id).await? {
                    Some(r) if r.record.is_live() => Ok(from_record(&r.record)),
                    _ => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let Some(record) = p.record.as_ref().filter(|r| r.record.is_live()) else {
            return Err(Error::VolumeNotFound(id.to_string()));
        };
        if p.require_primary(&id).is_err() {
            return Ok(from_record(&record.record));
        }
        let node = match p.holder() {
            Some(c) => c.node.clone(),
            None => return Err(Error::VolumeNotFound(id.to_string())),
        };
        let mut resp = self
            .on_node(&node, req, |mut c, r| async move {
                c.controller_get_volume(r).await
            })
            .await?;
        resp.volume = resp.volume.map(|v| self.cluster_volume(v));
        let wanted = p.primary.as_ref().map_or(1, |c| c.info.replicas);
        let silent = self.condition(&record.record);
        if let Some(status) = resp.status.as_mut() {
            let cond = status.volume_condition.get_or_insert_with(Default::default);
            cond.abnormal |= silent.abnormal;
            let parts = [
                std::mem::take(&mut cond.message),
                lag_report(&p, wanted).unwrap_or_default(),
                silent.message,
            ];
            cond.message = parts
                .into_iter()
                .filter(|m| !m.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
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
        respond(ClusterController::get_snapshot(self, req).await)
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        respond(self.expand(req.into_inner()).await)
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
        respond(self.create_group(req.into_inner()).await)
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                let Some(gid) = convert::group_id(&req.group_snapshot_id)? else {
                    return Ok(csi::DeleteVolumeGroupSnapshotResponse {});
                };
                let Some((node, members)) = self.group_holder(&gid).await? else {
                    return Ok(csi::DeleteVolumeGroupSnapshotResponse {});
                };
                self.cluster
                    .group(&node)?
                    .delete_volume_group_snapshot(req.clone())
                    .await
                    .map_err(|s| peer(&node, s))?;
                for (vol, ids) in members {
                    self.forget_snapshots(&vol, &ids).await?;
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
                let Some(gid) = convert::group_id(&req.group_snapshot_id)? else {
                    return Err(Error::GroupSnapshotNotFound(req.group_snapshot_id.clone()));
                };
                let Some((node, _)) = self.group_holder(&gid).await? else {
                    return Err(Error::GroupSnapshotNotFound(req.group_snapshot_id.clone()));
                };
                Ok(self
                    .cluster
                    .group(&node)?
                    .get_volume_group_snapshot(req)
                    .await
                    .map_err(|s| peer(&node, s))?
                    .into_inner())
            }
            .await,
        )
    }
}

impl ClusterController {
    async fn create_group(
        &self,
        req: csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::CreateVolumeGroupSnapshotResponse> {
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
        let resp = self
            .cluster
            .group(&node)?
            .create_volume_group_snapshot(req)
            .await
            .map_err(|s| peer(&node, s))?
            .into_inner();
        if let Some(g) = &resp.group_snapshot {
            for s in &g.snapshots {
                if let Some(vol) = VolumeId::parse(&s.source_volume_id) {
                    self.record_snapshots(
                        &vol,
                        &node,
                        std::slice::from_ref(s),
                        &g.group_snapshot_id,
                    )
                    .await?;
                }
            }
        }
        Ok(resp)
    }

    /// The node holding group snapshot `gid`, and its members by volume. Not found while
    /// some node is not adopted yet is UNAVAILABLE: the group may be there.
    async fn group_holder(
        &self,
        gid: &GroupSnapshotId,
    ) -> Result<Option<(String, Vec<(String, Vec<String>)>)>> {
        let records = placement::find_group(self.cluster.store.as_ref(), gid.as_str()).await?;
        let mut node = None;
        let mut members = Vec::new();
        for v in records {
            let ids: Vec<String> = v
                .record
                .snapshots
                .iter()
                .filter(|s| s.group_snapshot_id == gid.as_str())
                .map(|s| {
                    node.get_or_insert_with(|| s.node.clone());
                    s.snapshot_id.clone()
                })
                .collect();
            members.push((v.record.volume_id, ids));
        }
        let Some(node) = node else {
            self.cluster
                .known_absent(&format!("group snapshot {gid}"))?;
            return Ok(None);
        };
        self.answering(&node, format!("it holds group snapshot {gid}"))
            .await?;
        Ok(Some((node, members)))
    }
}
