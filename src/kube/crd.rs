//! berth's custom resources, `berth.csi.dev/v1alpha1`: BerthNode, BerthVolume and
//! VolumeMigration.
//!
//! The CustomResourceDefinitions are generated from these types ([`crds_yaml`], `berth crd`)
//! and committed as `charts/berth/crds/berth.csi.dev.yaml`; tests/chart.rs fails when the two
//! differ.
//!
//! ## Why a BerthNode rather than annotations on the Node
//!
//! Each node plugin publishes its BerthNode (`node_heartbeat`) so that the cluster controller
//! finds every node's agent (`discover_nodes`). Annotations on the Node object could carry
//! the same, but writing them needs `patch nodes`, which RBAC cannot narrow to one node or to
//! annotations: every node plugin would hold write access to every Node of the cluster (its
//! labels, taints, unschedulable flag). Least privilege: a BerthNode is berth's own object,
//! and the node plugin's rights on it (create and patch berthnodes) reach nothing else. As a
//! custom resource it also gets a schema the API server enforces, a status subresource that
//! keeps the heartbeat apart from the spec, and printer columns for `kubectl get berthnodes`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of berth's custom resources.
pub const GROUP: &str = "berth.csi.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// A berth node plugin, as it publishes itself: the object is named after the node id.
// Each printcolumn repeats the keys `name` and `type_`, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "berth.csi.dev",
    version = "v1alpha1",
    kind = "BerthNode",
    shortname = "bn",
    category = "berth",
    status = "BerthNodeStatus",
    derive = "PartialEq",
    doc = "A berth node plugin: where its agent listens and what its pool holds.",
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.agentAddress"),
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.availableBytes"
    ),
    printcolumn(name = "Total", type_ = "integer", json_path = ".status.totalBytes"),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.heartbeatTime"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.version",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BerthNodeSpec {
    /// Where the node's agent listens, host:port (mutual TLS), e.g. 10.0.0.5:7070.
    #[schemars(length(min = 1))]
    pub agent_address: String,
    /// The topology domain the node moves volumes within (topology.berth.csi.dev/domain).
    #[schemars(length(min = 1))]
    pub domain: String,
}

/// What the node plugin last reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[schemars(transform = signed_integers)]
#[serde(rename_all = "camelCase")]
pub struct BerthNodeStatus {
    /// Size of the node's pool, in bytes.
    pub total_bytes: u64,
    /// Free space of the node's pool, in bytes.
    pub available_bytes: u64,
    /// When the node plugin last published this status (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub heartbeat_time: String,
    /// The berth version the node runs.
    pub version: String,
}

/// Where a volume lives, as berth's controller last decided it: one cluster-scoped object per
/// volume, named after the volume id, written only with the resourceVersion it was read at.
// Each printcolumn repeats the keys `name` and `type_`, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "berth.csi.dev",
    version = "v1alpha1",
    kind = "BerthVolume",
    shortname = "bv",
    category = "berth",
    derive = "PartialEq",
    doc = "Where a berth volume lives: its primary node, epoch and replicas. Written by the berth controller only.",
    printcolumn(name = "Claim", type_ = "string", json_path = ".spec.claim"),
    printcolumn(name = "Primary", type_ = "string", json_path = ".spec.primary"),
    // A printer column shows one value (the API server takes a JSONPath's first match), so
    // each replica has columns of its own: the first by default, the second in `-o wide`.
    printcolumn(
        name = "Replica",
        type_ = "string",
        json_path = ".spec.replicas[0].node"
    ),
    // A date renders as an age: how old the replica's newest snapshot is, its lag.
    printcolumn(
        name = "Replica Age",
        type_ = "date",
        json_path = ".spec.replicas[0].snapshotTime"
    ),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".spec.epoch"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".spec.phase"),
    printcolumn(
        name = "Replica 2",
        type_ = "string",
        json_path = ".spec.replicas[1].node",
        priority = 1
    ),
    printcolumn(
        name = "Replica 2 Age",
        type_ = "date",
        json_path = ".spec.replicas[1].snapshotTime",
        priority = 1
    ),
    printcolumn(
        name = "Moving To",
        type_ = "string",
        json_path = ".spec.handoff.to",
        priority = 1
    ),
    // Shown by default: a failed-over volume's stale copy waits on that node.
    printcolumn(
        name = "Failed Over From",
        type_ = "string",
        json_path = ".spec.failover.from"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct BerthVolumeSpec {
    #[serde(flatten)]
    pub placement: crate::placement::VolumePlacement,
}

/// Which claim's volume to copy to which node. Immutable.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "berth.csi.dev",
    version = "v1alpha1",
    kind = "VolumeMigration",
    namespaced,
    // "vm" is KubeVirt's VirtualMachine.
    shortname = "volmig",
    category = "berth",
    status = "VolumeMigrationStatus",
    derive = "PartialEq",
    doc = "Copies the volume of a claim to another node ahead of moving it there.",
    printcolumn(name = "Claim", type_ = "string", json_path = ".spec.pvc"),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetNode"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Percent", type_ = "integer", json_path = ".status.percent"),
    printcolumn(
        name = "Round",
        type_ = "integer",
        json_path = ".status.round",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self == oldSelf").message(
    "spec is immutable: delete this VolumeMigration and create another"
))]
#[serde(rename_all = "camelCase")]
pub struct VolumeMigrationSpec {
    /// The PersistentVolumeClaim whose volume moves, in the VolumeMigration's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub pvc: String,
    /// The berth node id (topology.berth.csi.dev/node) to copy the volume to.
    #[schemars(length(min = 1, max = 253))]
    pub target_node: String,
}

/// Where a VolumeMigration stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MigrationPhase {
    /// Not started, or waiting for the claim to be bound.
    #[default]
    Pending,
    /// The target node is receiving a copy of the volume.
    Copying,
    /// The target holds a recent copy: reschedule the pod onto it to cut over.
    ReadyToCutOver,
    /// The volume lives on the target node.
    Completed,
    /// It cannot succeed (the claim or the node does not exist): see message and conditions.
    Failed,
}

impl MigrationPhase {
    /// Completed and Failed are final: nothing more happens to the migration.
    pub fn is_terminal(self) -> bool {
        matches!(self, MigrationPhase::Completed | MigrationPhase::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Pending => "Pending",
            MigrationPhase::Copying => "Copying",
            MigrationPhase::ReadyToCutOver => "ReadyToCutOver",
            MigrationPhase::Completed => "Completed",
            MigrationPhase::Failed => "Failed",
        }
    }
}

/// Progress of a VolumeMigration, written by the berth controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[schemars(transform = signed_integers)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMigrationStatus {
    pub phase: MigrationPhase,
    /// Bytes of the current copy round shipped so far.
    pub bytes_done: u64,
    /// Bytes the current copy round ships.
    pub bytes_total: u64,
    /// bytesDone of bytesTotal, 0 to 100.
    #[schemars(range(max = 100))]
    pub percent: u32,
    /// Copy rounds so far: each round ships what changed during the previous one.
    pub round: u32,
    /// What is happening, or why the migration failed or is retrying.
    pub message: String,
    /// `Ready` (the target holds a copy to cut over to) and `Complete` (the volume lives on
    /// the target), in the usual metav1.Condition form.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Kubernetes knows the integer formats int32 and int64 only (OpenAPI 3.0) and warns about
/// schemars' uint32 and uint64 at every apply of the CRD: unsigned fields become int64 with
/// minimum 0 (and uint32's maximum): the API server keeps every integer as an int64 anyway.
pub(crate) fn signed_integers(schema: &mut schemars::Schema) {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                let format = map.get("format").and_then(|f| f.as_str());
                if let Some(unsigned @ ("uint32" | "uint64")) = format {
                    if unsigned == "uint32" {
                        map.entry("maximum").or_insert(u32::MAX.into());
                    }
                    map.insert("format".into(), "int64".into());
                    map.insert("minimum".into(), 0.into());
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v = schema.as_value().clone();
    walk(&mut v);
    *schema = schemars::Schema::try_from(v).expect("still a schema");
}

/// The CustomResourceDefinitions as one multi-document YAML stream (the output of
/// `berth crd`, committed as charts/berth/crds/berth.csi.dev.yaml). Deterministic: the same
/// build always prints the same bytes.
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# berth's CustomResourceDefinitions, generated by `berth crd` (berth::kube::crd); do not edit.\n",
    );
    for (n, crd) in [BerthNode::crd(), BerthVolume::crd(), VolumeMigration::crd()]
        .iter()
        .enumerate()
    {
        if n > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(crd).expect("a CRD serializes to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_yaml_is_deterministic_and_holds_every_kind() {
        let yaml = crds_yaml();
        assert_eq!(yaml, crds_yaml());
        assert!(yaml.contains("name: berthnodes.berth.csi.dev"), "{yaml}");
        assert!(yaml.contains("name: berthvolumes.berth.csi.dev"), "{yaml}");
        assert!(
            yaml.contains("name: volumemigrations.berth.csi.dev"),
            "{yaml}"
        );
        assert_eq!(yaml.matches("\n---\n").count(), 2);
    }

    #[test]
    fn scopes_names_and_subresources() {
        let bn = BerthNode::crd();
        assert_eq!(bn.spec.scope, "Cluster");
        assert_eq!(bn.spec.names.short_names, Some(vec!["bn".to_string()]));
        let vm = VolumeMigration::crd();
        assert_eq!(vm.spec.scope, "Namespaced");
        assert_eq!(vm.spec.names.short_names, Some(vec!["volmig".to_string()]));
        for crd in [&bn, &vm] {
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, VERSION);
            assert!(v.subresources.as_ref().unwrap().status.is_some());
            assert!(v.additional_printer_columns.is_some());
            assert_eq!(crd.spec.group, GROUP);
        }
    }

    #[test]
    fn volume_migration_spec_is_immutable() {
        let json = serde_json::to_string(&VolumeMigration::crd()).unwrap();
        assert!(json.contains(r#""rule":"self == oldSelf""#), "{json}");
    }

    #[test]
    fn status_round_trips_in_its_wire_form() {
        let s: VolumeMigrationStatus = serde_json::from_value(serde_json::json!({
            "phase": "ReadyToCutOver", "bytesDone": 5, "bytesTotal": 10, "percent": 50,
            "round": 2, "message": "m",
        }))
        .unwrap();
        assert_eq!(s.phase, MigrationPhase::ReadyToCutOver);
        assert!(s.conditions.is_empty());
        assert_eq!(serde_json::to_value(&s).unwrap()["bytesDone"], 5);
    }
}
