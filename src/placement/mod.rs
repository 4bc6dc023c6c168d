//! The placement record: one authoritative record per volume, outside the nodes, of who
//! holds it. It names the primary node and the epoch that node serves at, the replicas with
//! the shipping snapshot each holds, and a hand-off in flight.
//!
//! Why it exists: without it, every decision about a volume starts from every node's
//! inventory, because a silent node might hold a newer primary or a volume of the same name.
//! One silent node then stops every volume operation in the cluster. With the record, a call
//! about one volume reads one record and talks only to the nodes it names.
//!
//! Why it is safe: every change of ownership is one compare-and-swap on the record
//! ([`PlacementStore::replace`] with the version read). Of two controllers (two replicas, or
//! a stale leader that has not noticed it lost its lease) deciding different owners from one
//! version, exactly one write lands; the other gets [`Error::Conflict`] and must read again.
//! The record's epoch is the fencing token the nodes enforce: a node refuses a command that
//! carries an epoch older than the one it holds, so a controller acting on an old record is
//! refused by the nodes as well as by the store.
//!
//! Two stores implement it: [`FileStore`] (one controller, `--nodes FILE`: crash-safe files
//! on the controller's disk) and the `BerthVolume` custom resource
//! (`crate::kube::PlacementApi`: etcd behind the API server, resourceVersion as the version).

mod file;

use std::collections::BTreeMap;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::file::FileStore;
use crate::{
    error::{Error, Result},
    storage::VolumeId,
};

/// Where one volume lives. Serialized as the `spec` of a BerthVolume (camelCase), and as the
/// file store's record.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
// Kubernetes knows int64, not uint64 (crate::kube::crd::signed_integers).
#[schemars(transform = crate::kube::crd::signed_integers)]
#[serde(rename_all = "camelCase")]
pub struct VolumePlacement {
    /// The CSI volume id (also the BerthVolume's name).
    #[schemars(length(min = 1, max = 63))]
    pub volume_id: String,
    /// The CreateVolume name the id derives from.
    #[schemars(length(min = 1))]
    pub name: String,
    pub phase: PlacementPhase,
    /// The node whose copy may be written; empty only while the volume is being created.
    #[serde(default)]
    pub primary: String,
    /// The epoch the primary serves at: every change of primary raises it, and a node
    /// refuses commands of a lower epoch than it holds.
    pub epoch: u64,
    /// Copies kept up to date by replication (or left behind by a move), by node.
    #[serde(default)]
    pub replicas: Vec<ReplicaPlacement>,
    /// A hand-off to another node in flight: the primary is fenced towards it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Handoff>,
    /// Size of the volume, bytes.
    pub capacity_bytes: u64,
    /// The CreateVolume parameters that decide placement and replication (`replicas`,
    /// `replicationInterval`, ...), as the StorageClass gave them.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// The claim the volume serves, `namespace/name`, when the provisioner said (Events go
    /// there).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub claim: String,
    /// The volume failed over from a lost node: kept until that node's stale copy has
    /// been demoted (its writes set aside as a snapshot), so that it is never served again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailedOver>,
    /// The CSI snapshots cut from this volume, and the node holding each: a snapshot call
    /// goes to that node only. They outlive the volume (phase `Deleted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotPlacement>,
}

/// A copy of a CSI snapshot of the volume, as CreateSnapshot answered it. A snapshot
/// restored on another node was shipped there and has one entry per node holding it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
// Kubernetes knows int64, not uint64 (crate::kube::crd::signed_integers).
#[schemars(transform = crate::kube::crd::signed_integers)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPlacement {
    pub snapshot_id: String,
    pub node: String,
    pub size_bytes: u64,
    /// When it was cut, nanoseconds since the Unix epoch.
    pub created_unix_nanos: i64,
    /// The group snapshot it belongs to, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_snapshot_id: String,
}

/// A failover: the replica promoted in place of a lost primary, and from what.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedOver {
    /// The lost node, which may still hold a stale copy.
    pub from: String,
    /// The shipping snapshot the new primary was promoted from.
    pub snapshot: String,
    /// When that snapshot was cut (RFC 3339): writes after it on the lost node are not in
    /// the new primary.
    pub snapshot_time: String,
    /// When the failover was recorded (RFC 3339).
    pub at: String,
}

/// The lifecycle of a volume's record.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PlacementPhase {
    /// Recorded before the node makes the volume: a crash here leaves a record that the
    /// next CreateVolume of the name completes, or a DeleteVolume removes.
    #[default]
    Creating,
    Ready,
    /// Recorded before the copies are deleted; the record goes last.
    Deleting,
    /// The volume is gone, but snapshots cut from it remain: the record keeps where they
    /// are until the last one is deleted.
    Deleted,
}

/// A node holding a replica of the volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
// Kubernetes knows int64, not uint64 (crate::kube::crd::signed_integers).
#[schemars(transform = crate::kube::crd::signed_integers)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPlacement {
    pub node: String,
    /// The newest shipping snapshot the node holds; empty before its first round.
    #[serde(default)]
    pub snapshot: String,
    /// When that snapshot was cut (RFC 3339): the replica is that old.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot_time: String,
}

/// A hand-off of the primary to another node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
// Kubernetes knows int64, not uint64 (crate::kube::crd::signed_integers).
#[schemars(transform = crate::kube::crd::signed_integers)]
#[serde(rename_all = "camelCase")]
pub struct Handoff {
    /// The node the volume moves to.
    pub to: String,
    /// The epoch the new primary will serve at (the record's epoch + 1).
    pub epoch: u64,
}

/// A record with the version it was read at: the token of the next compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub record: VolumePlacement,
    /// Opaque: a resourceVersion, or the file store's counter.
    pub version: String,
}

/// A page of records in volume-id order.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub records: Vec<Versioned>,
    /// Where the next page starts; None after the last.
    pub next: Option<String>,
}

/// The authoritative record store. Every write is conditional: [`create`] fails when a
/// record of the id exists, [`replace`] and [`delete`] when the record changed since
/// `version` was read. Both fail with [`Error::Conflict`] (ABORTED): the caller reads
/// again and decides again.
///
/// [`create`]: PlacementStore::create
/// [`replace`]: PlacementStore::replace
/// [`delete`]: PlacementStore::delete
#[async_trait]
pub trait PlacementStore: Send + Sync + std::fmt::Debug + 'static {
    async fn get(&self, id: &VolumeId) -> Result<Option<Versioned>>;

    async fn create(&self, record: &VolumePlacement) -> Result<Versioned>;

    /// Replaces the record read at `version` with `record` (the same volume id).
    async fn replace(&self, record: &VolumePlacement, version: &str) -> Result<Versioned>;

    /// Deletes the record read at `version`; a record already gone is success.
    async fn delete(&self, id: &VolumeId, version: &str) -> Result<()>;

    /// Up to `limit` records (at least one) after `start` (a page's `next`).
    async fn list(&self, start: Option<&str>, limit: usize) -> Result<Page>;
}

/// Every record, page by page (for background work and snapshot look-ups).
pub async fn all(store: &dyn PlacementStore) -> Result<Vec<Versioned>> {
    const PAGE: usize = 500;
    let mut out = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let page = store.list(next.as_deref(), PAGE).await?;
        out.extend(page.records);
        match page.next {
            Some(n) => next = Some(n),
            None => return Ok(out),
        }
    }
}

impl VolumePlacement {
    /// Every node holding, or about to hold, a copy of the volume: the primary, the
    /// replicas and a hand-off's target. Calls about the volume talk to these only.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = std::iter::once(self.primary.clone())
            .chain(self.replicas.iter().map(|r| r.node.clone()))
            .chain(self.handoff.iter().map(|h| h.to.clone()))
            .filter(|n| !n.is_empty())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Whether the record stands for a volume that exists (or is being made).
    pub fn is_live(&self) -> bool {
        matches!(self.phase, PlacementPhase::Creating | PlacementPhase::Ready)
    }

    /// The record's id, checked: a record whose id this driver could not have issued is
    /// damage from outside, never a path.
    pub fn id(&self) -> Result<VolumeId> {
        VolumeId::parse(&self.volume_id).ok_or_else(|| {
            Error::invalid(
                "volume_id",
                format!("{:?} is not a berth volume id", self.volume_id),
            )
        })
    }
}

/// The record holding CSI snapshot `id`. A scan of every record: snapshot calls are rare
/// next to volume calls, and a record per snapshot would double the objects to keep.
pub async fn find_snapshot(store: &dyn PlacementStore, id: &str) -> Result<Option<Versioned>> {
    Ok(all(store)
        .await?
        .into_iter()
        .find(|v| v.record.snapshots.iter().any(|s| s.snapshot_id == id)))
}

/// The records holding members of group snapshot `id`.
pub async fn find_group(store: &dyn PlacementStore, id: &str) -> Result<Vec<Versioned>> {
    Ok(all(store)
        .await?
        .into_iter()
        .filter(|v| v.record.snapshots.iter().any(|s| s.group_snapshot_id == id))
        .collect())
}

/// As [`update`], for a record that may not exist yet: `change` sees None and makes it.
pub async fn upsert<F>(
    store: &dyn PlacementStore,
    id: &VolumeId,
    mut change: F,
) -> Result<Versioned>
where
    F: FnMut(Option<&VolumePlacement>) -> Result<VolumePlacement> + Send,
{
    const ROUNDS: usize = 64;
    for _ in 0..ROUNDS {
        let written = match store.get(id).await? {
            None => store.create(&change(None)?).await,
            Some(cur) => {
                store
                    .replace(&change(Some(&cur.record))?, &cur.version)
                    .await
            }
        };
        match written {
            Err(Error::Conflict { .. }) => continue,
            other => return other,
        }
    }
    Err(Error::Conflict {
        what: format!("placement of {id}"),
        reason: format!("{ROUNDS} concurrent writers won in a row"),
    })
}

/// Reads, changes and writes back one record until the write lands: `change` sees the
/// current record and returns the next one (or an error, which ends the loop). For changes
/// that are correct whatever the record became meanwhile, such as recording a replica's
/// newer snapshot; an ownership change decides from what it read and must not retry blind.
pub async fn update<F>(
    store: &dyn PlacementStore,
    id: &VolumeId,
    mut change: F,
) -> Result<Versioned>
where
    F: FnMut(&VolumePlacement) -> Result<VolumePlacement> + Send,
{
    // Each round loses only to a write that landed; a bound keeps a livelock visible.
    const ROUNDS: usize = 64;
    for _ in 0..ROUNDS {
        let Some(current) = store.get(id).await? else {
            return Err(Error::VolumeNotFound(id.to_string()));
        };
        let next = change(&current.record)?;
        match store.replace(&next, &current.version).await {
            Err(Error::Conflict { .. }) => continue,
            other => return other,
        }
    }
    Err(Error::Conflict {
        what: format!("placement of {id}"),
        reason: format!("{ROUNDS} concurrent writers won in a row"),
    })
}
