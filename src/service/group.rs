//! CSI GroupController service: crash-consistent snapshots across several volumes.

use std::{collections::BTreeSet, sync::Arc};

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{Context, capabilities, convert, params, respond};
use crate::{
    error::{Error, Result},
    proto::csi::v1::{self as csi, group_controller_server::GroupController},
    storage::{
        GroupSnapshotId, GroupSnapshotRecord, RecordState, SnapshotRecord, VolumeId,
        node::NodeState, now_nanos,
    },
    util::failpoint,
};

#[derive(Debug, Clone)]
pub struct GroupService {
    ctx: Arc<Context>,
}

impl GroupService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    async fn create(
        &self,
        req: csi::CreateVolumeGroupSnapshotRequest,
    ) -> Result<csi::CreateVolumeGroupSnapshotResponse> {
        let name = convert::name(&req.name)?;
        if req.source_volume_ids.is_empty() {
            return Err(Error::Missing("source_volume_ids"));
        }
        params::snapshot_params(&req.parameters)?;
        let mut volumes = Vec::new();
        for raw in &req.source_volume_ids {
            let id = convert::existing_volume_id(raw)?;
            if volumes.contains(&id) {
                return Err(Error::invalid(
                    "source_volume_ids",
                    format!("{id} is listed twice"),
                ));
            }
            volumes.push(id);
        }
        let id = GroupSnapshotId::for_name(name);
        self.thaw_leftovers().await;
        let keys = std::iter::once(id.to_string()).chain(volumes.iter().map(|v| v.to_string()));
        let _guard = self.ctx.inflight.try_lock(keys.collect::<Vec<_>>())?;
        let pool = &self.ctx.pool;

        if let Some(g) = pool.group(&id)?
            && g.state == RecordState::Ready
        {
            let same = g.source_volumes.iter().collect::<BTreeSet<_>>()
                == volumes.iter().collect::<BTreeSet<_>>();
            if !same {
                return Err(Error::AlreadyExists {
                    kind: "group snapshot",
                    name: name.to_string(),
                    detail: format!("it was taken of {:?}", g.source_volumes),
                });
            }
            return self.response(&g);
        }
        for v in &volumes {
            pool.ready_volume(v)?;
        }
        // Members are named with a NUL separator, which convert::name refuses in CO names
        // (the spec bans U+0000), so a member's id can never be a snapshot the CO made.
        let member_name = |v: &VolumeId| format!("{name}\u{0}{v}");
        let mut record = GroupSnapshotRecord {
            id: id.clone(),
            name: name.to_string(),
            source_volumes: volumes.clone(),
            snapshots: volumes
                .iter()
                .map(|v| crate::storage::SnapshotId::for_name(&member_name(v)))
                .collect(),
            state: RecordState::Creating,
            created_unix_nanos: now_nanos(),
        };
        pool.save_group(&record)?;

        let built = async {
            let mut pending = Vec::new();
            for v in &volumes {
                match pool.begin_snapshot(&member_name(v), v, Some(&id)).await? {
                    Ok(rec) => pending.push(rec),
                    Err(done) => pending.push(done),
                }
            }
            self.cut(pending).await
        }
        .await;
        let members = match built {
            Ok(m) => m,
            Err(e) => {
                // Spec: when a group snapshot fails before every member is cut, the CO has
                // no group id to delete, so the plugin cleans up and leaks no snapshots.
                if let Err(c) = pool.delete_group(&record) {
                    tracing::warn!(error = %c, "cleanup after a failed group snapshot");
                }
                return Err(e);
            }
        };
        // Every member is a ready snapshot now, but the group is not: a crash here must not
        // leave them behind (reconcile discards the members of an unfinished group).
        failpoint::hit("group-snapshot:after-members");
        record.state = RecordState::Ready;
        record.created_unix_nanos = members
            .iter()
            .map(|s| s.created_unix_nanos)
            .max()
            .unwrap_or_else(now_nanos);
        pool.save_group(&record)?;
        self.response(&record)
    }

    /// Thaws what a group snapshot froze and no running request holds: a thaw that failed
    /// earlier, or a guard's thaw that could not clear the record. Without this, every
    /// retry would fail with EBUSY on a filesystem left frozen. A volume whose in-flight
    /// guard is taken belongs to a running request, which thaws it itself. The thaw clears
    /// the record's mark, so a later freeze by someone else is never mistaken for berth's.
    async fn thaw_leftovers(&self) {
        let frozen = match self.ctx.node.frozen() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "could not list frozen volumes");
                return;
            }
        };
        for v in frozen {
            let Ok(_guard) = self.ctx.inflight.try_lock([v.to_string()]) else {
                continue;
            };
            tracing::warn!(volume.id = %v, "thawing a filesystem a group snapshot left frozen");
            if let Err(e) = self.ctx.node.thaw(&v).await {
                tracing::error!(volume.id = %v, error = %e, "could not thaw");
            }
        }
    }

    /// Freezes every mounted member, reflinks them all, thaws: one cut across all volumes.
    /// The thaw runs whatever happened in between, for every member whose freeze was tried
    /// (a freeze that failed or timed out may still have frozen it), and on a panic too
    /// (the [`Frozen`] guard). A crash in between is caught by the node's reconcile, which
    /// thaws what its records say is frozen.
    async fn cut(&self, pending: Vec<SnapshotRecord>) -> Result<Vec<SnapshotRecord>> {
        let pool = &self.ctx.pool;
        let mut frozen = Frozen {
            node: self.ctx.node.clone(),
            volumes: Vec::new(),
        };
        let mut result = Ok(());
        for s in &pending {
            if s.state == RecordState::Ready {
                continue;
            }
            frozen.volumes.push(s.source_volume.clone());
            match self.ctx.node.freeze(&s.source_volume).await {
                Ok(true) => {}
                Ok(false) => {
                    frozen.volumes.pop();
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        failpoint::hit("group-snapshot:while-frozen");
        let mut copied = Vec::new();
        if result.is_ok() {
            for s in &pending {
                if s.state == RecordState::Ready {
                    continue;
                }
                if let Err(e) = pool.copy_snapshot(s).await {
                    result = Err(e);
                    break;
                }
                copied.push(s.id.clone());
            }
        }
        if let Err(e) = frozen.thaw().await
            && result.is_ok()
        {
            result = Err(e);
        }
        result?;
        pending
            .into_iter()
            .map(|s| {
                if s.state == RecordState::Ready {
                    Ok(s)
                } else {
                    pool.finish_snapshot(s)
                }
            })
            .collect()
    }

    fn response(&self, g: &GroupSnapshotRecord) -> Result<csi::CreateVolumeGroupSnapshotResponse> {
        Ok(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.to_group(g)?),
        })
    }

    fn to_group(&self, g: &GroupSnapshotRecord) -> Result<csi::VolumeGroupSnapshot> {
        let snapshots = g
            .snapshots
            .iter()
            .map(|s| {
                self.ctx
                    .pool
                    .ready_snapshot(s)
                    .map(|r| convert::to_snapshot(&r))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(csi::VolumeGroupSnapshot {
            group_snapshot_id: g.id.to_string(),
            snapshots,
            creation_time: Some(convert::timestamp(g.created_unix_nanos)),
            ready_to_use: true,
        })
    }

    /// spec.md, both RPCs: "If SP does not need to rely on this field [snapshot_ids] ..., it
    /// SHOULD check this field and report an error if it has the ability to detect a
    /// mismatch." berth finds the members from its own record, so an empty list (what
    /// csi-sanity sends) is not checked; a list that is given must match exactly.
    fn check_members(g: &GroupSnapshotRecord, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let given: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        let have: BTreeSet<&str> = g.snapshots.iter().map(|s| s.as_str()).collect();
        if given != have {
            return Err(Error::invalid(
                "snapshot_ids",
                format!("group snapshot {} holds {have:?}, not {given:?}", g.id),
            ));
        }
        Ok(())
    }

    fn delete(
        &self,
        req: csi::DeleteVolumeGroupSnapshotRequest,
    ) -> Result<csi::DeleteVolumeGroupSnapshotResponse> {
        let id = convert::group_id(&req.group_snapshot_id)?;
        let Some(id) = id else {
            return Ok(csi::DeleteVolumeGroupSnapshotResponse {});
        };
        let _guard = self.ctx.inflight.try_lock([id.to_string()])?;
        let pool = &self.ctx.pool;
        let Some(g) = pool.group(&id)? else {
            return Ok(csi::DeleteVolumeGroupSnapshotResponse {});
        };
        Self::check_members(&g, &req.snapshot_ids)?;
        pool.delete_group(&g)?;
        Ok(csi::DeleteVolumeGroupSnapshotResponse {})
    }

    fn get(
        &self,
        req: csi::GetVolumeGroupSnapshotRequest,
    ) -> Result<csi::GetVolumeGroupSnapshotResponse> {
        let id = convert::group_id(&req.group_snapshot_id)?;
        let id = id.ok_or_else(|| Error::GroupSnapshotNotFound(req.group_snapshot_id.clone()))?;
        let g = self
            .ctx
            .pool
            .group(&id)?
            .filter(|g| g.state == RecordState::Ready)
            .ok_or_else(|| Error::GroupSnapshotNotFound(id.to_string()))?;
        Self::check_members(&g, &req.snapshot_ids)?;
        Ok(csi::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.to_group(&g)?),
        })
    }
}

/// The members a group snapshot may have frozen. [`Frozen::thaw`] thaws them; if the guard
/// is dropped before that (a panic, the runtime shutting down), its drop thaws them, without
/// awaiting: Drop cannot.
struct Frozen {
    node: Arc<NodeState>,
    volumes: Vec<VolumeId>,
}

impl Frozen {
    /// Thaws every member, in reverse order, each even if another fails; returns the first
    /// failure.
    async fn thaw(mut self) -> Result<()> {
        let mut result = Ok(());
        while let Some(v) = self.volumes.pop() {
            if let Err(e) = self.node.thaw(&v).await {
                tracing::error!(volume.id = %v, error = %e, "failed to thaw after group snapshot");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        while let Some(v) = self.volumes.pop() {
            tracing::warn!(volume.id = %v, "group snapshot ended without its thaw; thawing");
            if let Err(e) = self.node.thaw_blocking(&v) {
                tracing::error!(volume.id = %v, error = %e, "could not thaw");
            }
        }
    }
}

#[tonic::async_trait]
impl GroupController for GroupService {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities::group_response()))
    }

    #[tracing::instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_volume_group_snapshot(
        &self,
        req: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        // Run in a task of its own, which a dropped request does not cancel: when the CO's
        // deadline passes mid-cut, the cut still finishes and thaws its members (holding
        // their in-flight guard until then), rather than leaving a database frozen.
        let this = self.clone();
        let req = req.into_inner();
        let task = tokio::spawn(async move { this.create(req).await }.in_current_span());
        respond(task.await.expect("group snapshot task panicked"))
    }

    #[tracing::instrument(skip_all, fields(group_snapshot.id = %req.get_ref().group_snapshot_id))]
    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        respond(self.delete(req.into_inner()))
    }

    #[tracing::instrument(skip_all, fields(group_snapshot.id = %req.get_ref().group_snapshot_id))]
    async fn get_volume_group_snapshot(
        &self,
        req: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        respond(self.get(req.into_inner()))
    }
}
