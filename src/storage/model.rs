//! berth's own vocabulary: ids, sizes, volume and snapshot records. Nothing here knows
//! about protobuf; the conversion lives at the gRPC edge (`service::convert`).

use std::{collections::BTreeMap, fmt, time::SystemTime};

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($name:ident, $prefix:literal) => {
        /// An id this driver issued: a fixed prefix and 32 hex digits derived from the CO's
        /// name. Deriving it from the name makes a retried create after a crash land on the
        /// same id (and so find what the first attempt left). Only strings of exactly this
        /// shape are accepted, so an id can be joined to a pool path without ever escaping it.
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn for_name(name: &str) -> Self {
                let hash = blake3::hash(format!("{}{}", $prefix, name).as_bytes());
                Self(format!("{}{}", $prefix, &hash.to_hex()[..32]))
            }

            /// `None` for anything this driver could not have issued.
            pub fn parse(s: &str) -> Option<Self> {
                let hex = s.strip_prefix($prefix)?;
                (hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                    .then(|| Self(s.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s).ok_or_else(|| format!("not a {} id: {s:?}", stringify!($name)))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

id_type!(VolumeId, "vol-");
id_type!(SnapshotId, "snap-");
id_type!(GroupSnapshotId, "group-");

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// What a volume is formatted as, fixed at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum VolumeKind {
    Filesystem { fs_type: FsType },
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// Smallest device the formatter accepts (mkfs.xfs refuses filesystems under 300 MiB).
    pub fn min_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => MIB,
            FsType::Xfs => 300 * MIB,
        }
    }
}

/// The lifecycle of a record. A record is written *before* the data it describes exists
/// (`Creating`) and marked `Deleting` before its data is removed, so a crash at any point
/// leaves a record saying what to finish or undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    Creating,
    Ready,
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "id")]
pub enum VolumeSource {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

impl VolumeSource {
    /// The id of the snapshot or volume the new volume is made from.
    pub fn id(&self) -> &str {
        match self {
            VolumeSource::Snapshot(s) => s.as_str(),
            VolumeSource::Volume(v) => v.as_str(),
        }
    }
}

/// Settings a StorageClass or VolumeAttributesClass may change after creation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MutableSettings {
    /// Allocate every block of the image up front (thick provisioning): the volume can never
    /// hit ENOSPC in the pool, and the database's files do not fragment as they grow.
    pub preallocate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub capacity_bytes: u64,
    pub kind: VolumeKind,
    pub source: Option<VolumeSource>,
    pub settings: MutableSettings,
    /// Kubernetes object names passed by the provisioner's extra-create-metadata.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub state: RecordState,
    /// Nodes the volume is ControllerPublished to, and how.
    #[serde(default)]
    pub published: BTreeMap<String, Attachment>,
    pub created_unix_nanos: u128,
    /// Which generation of primary this copy is. Every hand-off raises it; when two nodes
    /// both claim a volume, the higher epoch is the primary and the other is stale.
    #[serde(default)]
    pub epoch: u64,
    /// Set while the copy hands off to another node: no publish or stage is accepted.
    #[serde(default)]
    pub fence: Option<Fence>,
    /// Set when this node's lease lapsed while it held the volume as a replicated primary:
    /// its devices were fenced, and no publish or stage is accepted until the controller,
    /// having checked the placement record, resumes the copy or demotes it (`lease`).
    #[serde(default)]
    pub suspended: bool,
    #[serde(default)]
    pub replication: Replication,
}

/// A hand-off in progress: the copy stops accepting writes so `to` can take over at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub to: String,
    pub epoch: u64,
    /// The final shipping snapshot, cut after the fence took effect.
    pub snapshot: Option<SnapshotId>,
}

/// How many copies of a volume berth keeps on other nodes, and how fresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// Copies in all, the primary included: 1 means no replicas.
    pub replicas: u32,
    pub interval_seconds: u64,
    /// Whether a hand-off keeps the old primary as a replica, so a move back ships only
    /// what changed.
    pub keep_source: bool,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            replicas: 1,
            interval_seconds: 30,
            keep_source: true,
        }
    }
}

/// A copy of another node's volume, as of one shipping snapshot held in this pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// The primary's record as of the snapshot (published and fence cleared): what a
    /// promotion recreates.
    pub volume: VolumeRecord,
    /// The primary epoch this copy follows.
    pub epoch: u64,
    pub primary: String,
    pub snapshot: SnapshotId,
    /// The snapshot `snapshot` was shipped against, when it came as a delta and is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<SnapshotId>,
}

/// How a volume is ControllerPublished to a node: a repeat must ask for the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub readonly: bool,
    /// The CSI access mode's name.
    pub mode: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub name: String,
    pub source_volume: VolumeId,
    /// The source volume's size at snapshot time: the minimum size of a restore.
    pub size_bytes: u64,
    pub group: Option<GroupSnapshotId>,
    pub state: RecordState,
    /// Pool space held for the snapshot while it is being made (its image does not exist
    /// yet, so nothing else shows the reservation).
    #[serde(default)]
    pub reserved_bytes: u64,
    pub created_unix_nanos: u128,
    /// A snapshot berth cut to ship a volume to another node, not one a CO asked for: it
    /// is never listed, and goes with its volume.
    #[serde(default)]
    pub shipping: bool,
    /// What the source volume was (block, or which filesystem), so a restore can be checked
    /// after the source is deleted. `None` in records written before berth kept it, and in
    /// snapshots received from another node (the transfer does not carry it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<VolumeKind>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshotRecord {
    pub id: GroupSnapshotId,
    pub name: String,
    pub source_volumes: Vec<VolumeId>,
    pub snapshots: Vec<SnapshotId>,
    pub state: RecordState,
    pub created_unix_nanos: u128,
}

pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_only_issued_shapes_parse() {
        let a = VolumeId::for_name("pvc-1");
        assert_eq!(a, VolumeId::for_name("pvc-1"));
        assert_ne!(a, VolumeId::for_name("pvc-2"));
        assert_eq!(VolumeId::parse(a.as_str()), Some(a.clone()));
        for bad in [
            "",
            "vol-",
            "vol-../../etc/passwd",
            "vol-0123456789abcdef0123456789ABCDEF",
            "vol-0123456789abcdef0123456789abcdef0",
            "snap-0123456789abcdef0123456789abcdef",
            "vol-0123456789abcdef0123456789abcde/",
        ] {
            assert_eq!(VolumeId::parse(bad), None, "{bad:?}");
        }
        assert_ne!(
            SnapshotId::for_name("x").as_str()[5..],
            VolumeId::for_name("x").as_str()[4..],
            "kinds hash apart"
        );
    }
}
