//! The thin Kubernetes layer: berth's custom resources ([`crd`]), the few API calls berth
//! makes ([`ClusterApi`], implemented over kube-rs by [`KubeApi`]) and the background tasks
//! built on them ([`node_heartbeat`], [`node_lease`], [`discover_nodes`], [`leader_election`],
//! [`migrations`]); and the nodes' certificates through the CSR API ([`csr`], which talks
//! to kube-rs directly and is tested against a real API server instead).
//!
//! Everything above this module talks to [`ClusterApi`], never to a `kube::Client`, so the
//! rest of berth is tested without a cluster; this module's own tests run [`KubeApi`] against
//! a `tower_test` mock of the API server and assert every request it makes, and tests/kube.rs
//! runs it against a real API server, which proves each of those requests is accepted (and
//! allowed by the chart's RBAC).
//!
//! The RBAC rules in charts/berth/templates/rbac-*.yaml are exactly the requests made here:
//! each trait method names the verbs it needs.

mod client;
pub mod crd;
pub mod csr;
mod migrations;
mod placement;
mod tasks;
#[cfg(test)]
mod testing;

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use futures::stream::BoxStream;

use self::crd::{BerthNodeSpec, BerthNodeStatus, VolumeMigration, VolumeMigrationStatus};
pub use self::{
    client::{FIELD_MANAGER, KubeApi, REPORTING_CONTROLLER, connect, node_lease_name},
    migrations::{Migrator, migrations},
    placement::PlacementApi,
    tasks::{discover_nodes, leader_election, node_heartbeat, node_lease},
};
use crate::error::Result;

/// A BerthNode as the controller sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredNode {
    /// The node id (the BerthNode's name).
    pub id: String,
    /// Its agent's host:port.
    pub address: String,
    pub domain: String,
    /// None until the node plugin's first status write.
    pub status: Option<BerthNodeStatus>,
}

/// What [`ClusterApi::watch_migrations`] yields.
#[derive(Debug, Clone)]
pub enum MigrationEvent {
    /// Every VolumeMigration there is (a fresh list): one not in it is gone.
    Listed(Vec<VolumeMigration>),
    /// Created or changed.
    Applied(VolumeMigration),
    Deleted(VolumeMigration),
}

/// What [`ClusterApi::release_from_node`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// The VolumeAttachments' names.
    pub attachments: Vec<String>,
    /// The pods, as `namespace/name`.
    pub pods: Vec<String>,
}

/// A kubelet's node Lease (`kube-node-lease/<node>`), as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletLease {
    /// Changes at every renewal (the resourceVersion).
    pub mark: String,
    /// Its spec.leaseDurationSeconds (the kubelet's `nodeLeaseDurationSeconds`, 40 by
    /// default); the kubelet renews it every quarter of that.
    pub duration_secs: u32,
}

/// The Kubernetes API calls berth makes.
#[async_trait]
pub trait ClusterApi: Send + Sync + 'static {
    /// Node plugin: creates or updates its BerthNode, spec then status, by server-side apply
    /// with field manager [`FIELD_MANAGER`] (RBAC: berthnodes create, patch;
    /// berthnodes/status patch).
    async fn publish_node(
        &self,
        node_id: &str,
        spec: BerthNodeSpec,
        status: BerthNodeStatus,
    ) -> Result<()>;

    /// Controller: every BerthNode (RBAC: berthnodes list).
    async fn list_nodes(&self) -> Result<Vec<DiscoveredNode>>;

    /// Records an events.k8s.io/v1 Event about the PersistentVolumeClaim `namespace/name`:
    /// `reason` in CamelCase, `message` for people, Warning or Normal. It appears in
    /// `kubectl describe pvc` (RBAC: persistentvolumeclaims get, for the claim's uid;
    /// events.k8s.io events create).
    async fn pvc_event(
        &self,
        namespace: &str,
        name: &str,
        reason: &str,
        message: &str,
        warning: bool,
    ) -> Result<()>;

    /// The CSI volume handle of the claim's bound PersistentVolume; None while the claim is
    /// not bound. A claim that does not exist is NOT_FOUND; one bound to a volume of another
    /// driver is INVALID_ARGUMENT (RBAC: persistentvolumeclaims get, persistentvolumes get).
    async fn volume_handle(&self, namespace: &str, pvc: &str) -> Result<Option<String>>;

    /// VolumeMigrations in `namespace` (None: every namespace): a list, then a watch from
    /// that list's resourceVersion. The stream starts with [`MigrationEvent::Listed`]. It
    /// ends, after an error or without one, when the watch drops (the API server ends every
    /// watch after a while); call again, which lists afresh (RBAC: volumemigrations list,
    /// watch).
    async fn watch_migrations(
        &self,
        namespace: Option<&str>,
    ) -> Result<BoxStream<'static, Result<MigrationEvent>>>;

    /// Replaces a VolumeMigration's status through the status subresource (a JSON merge
    /// patch of the whole status; RBAC: volumemigrations/status patch).
    async fn set_migration_status(
        &self,
        namespace: &str,
        name: &str,
        status: &VolumeMigrationStatus,
    ) -> Result<()>;

    /// Acquires or renews the coordination.k8s.io/v1 Lease `namespace/name` for `holder`,
    /// valid `duration_secs`; true when `holder` holds it now. Every write carries the
    /// resourceVersion read just before, so of two candidates racing for it one gets 409
    /// Conflict and false. Another holder's lease is taken over only once it has stayed
    /// unchanged for its whole duration as measured by this process's clock, never by
    /// comparing the holder's timestamps with ours, so clock skew between nodes cannot make
    /// two leaders (RBAC: leases get, create, update).
    async fn try_acquire_lease(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        duration_secs: u32,
    ) -> Result<bool>;

    /// Gives up the Lease if `holder` holds it, so that a standby takes over at its next
    /// try instead of after the lease expires (RBAC: leases get, update).
    async fn release_lease(&self, namespace: &str, name: &str, holder: &str) -> Result<()>;

    /// Node plugin: creates or renews the coordination.k8s.io/v1 Lease `berth-node-<node>`
    /// in `namespace` (holder `node`, valid `duration_secs`, renewTime now, labelled
    /// `berth.csi.dev/node-lease`). Every renewal changes the object, so its resourceVersion
    /// moves on. Ok only once the API server accepted the write. A JSON merge patch, and a
    /// create when the Lease does not exist yet: one request per renewal, no read before it
    /// (RBAC: leases patch, create).
    async fn renew_node_lease(&self, namespace: &str, node: &str, duration_secs: u32)
    -> Result<()>;

    /// Controller: every node Lease in `namespace` (those labelled
    /// `berth.csi.dev/node-lease`), as node id → a mark that changes at every renewal (its
    /// resourceVersion). The caller measures expiry with its own clock, from when it first
    /// saw a mark, never by comparing the renewTime with its clock (see
    /// [`ClusterApi::try_acquire_lease`]) (RBAC: leases list).
    async fn node_leases(&self, namespace: &str) -> Result<BTreeMap<String, String>>;

    /// Controller: every kubelet's Lease in `kube-node-lease`, by node name. The caller
    /// measures a renewal by its own clock, from when it first saw a mark, as with
    /// [`ClusterApi::node_leases`] (RBAC: leases list, in `kube-node-lease`).
    async fn kubelet_leases(&self) -> Result<BTreeMap<String, KubeletLease>>;

    /// Controller: the Kubernetes Nodes tainted `node.kubernetes.io/out-of-service` (any
    /// value, effect NoExecute or NoSchedule), the standard signal that a node was shut down
    /// for good and what ran there may run elsewhere (RBAC: nodes list).
    async fn out_of_service_nodes(&self) -> Result<BTreeSet<String>>;

    /// Controller, once berth failed `volume_handle` over away from the lost `node`: gets
    /// what Kubernetes still holds there out of the way, so the workload comes back on
    /// another node. Force-deletes (grace period 0, guarded by the uid listed) the pods on
    /// `node` that use the volume's claim, recording a `PodEvicted` Warning Event on each;
    /// then deletes the VolumeAttachments of this driver that attach the volume's
    /// PersistentVolume to `node` (one already being deleted is left to the
    /// external-attacher). Other pods and attachments are left alone; anything already gone
    /// is success (RBAC: persistentvolumes list; pods list, delete;
    /// volumeattachments list, delete; events.k8s.io events create).
    async fn release_from_node(&self, volume_handle: &str, node: &str) -> Result<Released>;
}
