//! CSI conformance: every RPC berth serves, driven over its unix socket as a container
//! orchestrator would, against the spec's per-RPC error tables
//! (/work/shared/reference/csi-spec/spec.md, v1.12).
//!
//! Each test starts one real `berth all-in-one` process and runs a table of labelled cases
//! against it in order; a failing table reports every mismatching case at once, each named by
//! the spec condition it checks. Besides the success path, every mutating call is repeated
//! (idempotency: same answer, no second object), and every REQUIRED field is left out once
//! (spec.md "Error Scheme": missing required field → 3 INVALID_ARGUMENT).

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    io::{Seek, SeekFrom, Write},
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, Instant},
};

use common::*;
use csi::{
    controller_client::ControllerClient, group_controller_client::GroupControllerClient,
    node_client::NodeClient, volume_capability::access_mode::Mode,
};
use tonic::{Code, Status, transport::Channel};

type Ctl = ControllerClient<Channel>;

// ---- the table runner ------------------------------------------------------------------

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

struct Case {
    label: String,
    want: Code,
    call: Call,
}

fn case(label: impl Into<String>, want: Code, call: Call) -> Case {
    Case {
        label: label.into(),
        want,
        call,
    }
}

/// spec.md "Error Scheme": `subject` without its REQUIRED `field` → INVALID_ARGUMENT.
fn missing(subject: &str, field: &str, call: Call) -> Case {
    case(
        format!("Error Scheme: {subject} without {field} → INVALID_ARGUMENT"),
        Code::InvalidArgument,
        call,
    )
}

/// A path argument that is not absolute → INVALID_ARGUMENT.
fn relative(rpc: &str, field: &str, call: Call) -> Case {
    case(
        format!("{rpc}: relative {field} → INVALID_ARGUMENT"),
        Code::InvalidArgument,
        call,
    )
}

/// One RPC as a lazily run call: `rpc!(client, method, request)`.
macro_rules! rpc {
    ($client:expr, $method:ident, $req:expr) => {{
        let mut c = $client.clone();
        let req = $req;
        Box::pin(async move { c.$method(req).await.map(|_| ()) }) as Call
    }};
}

/// Runs the cases in order and fails once, listing every case whose code differs. A non-OK
/// status must also carry a message (spec.md "Error Scheme": "The status `message` MUST
/// contain a human readable description of error").
async fn run(table: &str, cases: Vec<Case>) {
    let n = cases.len();
    let mut failures = Vec::new();
    for c in cases {
        let (got, msg) = match c.call.await {
            Ok(()) => (Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_string()),
        };
        if got != c.want {
            failures.push(format!(
                "  [{}] want {:?}, got {got:?} {msg:?}",
                c.label, c.want
            ));
        } else if got != Code::Ok && msg.is_empty() {
            failures.push(format!("  [{}] {got:?} without a message", c.label));
        }
    }
    eprintln!("{table}: {n} cases");
    assert!(
        failures.is_empty(),
        "{table}: {} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---- request builders --------------------------------------------------------------------

/// Well-formed ids that name nothing.
const NO_VOL: &str = "vol-00000000000000000000000000000000";
const NO_SNAP: &str = "snap-00000000000000000000000000000000";
const NO_GROUP: &str = "group-00000000000000000000000000000000";
/// Ids that would escape the pool if they were ever joined to a path.
const EVIL_IDS: &[&str] = &[
    "../../etc",
    "vol-../x",
    "vol-../../../../etc/passwd",
    "/etc/passwd",
    "snap-../x",
    "group-../x",
    "vol-0123456789ABCDEF0123456789ABCDEF",
    "vol-0123456789abcdef0123456789abcdef0",
    "vol-0123456789abcdef0123456789abcde/",
];

fn ext4() -> csi::VolumeCapability {
    mount_cap("ext4")
}
fn xfs() -> csi::VolumeCapability {
    mount_cap("xfs")
}
fn block() -> csi::VolumeCapability {
    block_cap()
}
fn moded(cap: csi::VolumeCapability, m: Mode) -> csi::VolumeCapability {
    with_mode(cap, m)
}
/// A capability without its REQUIRED access type.
fn no_access_type() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: None,
        ..ext4()
    }
}
/// A capability without its REQUIRED access mode.
fn no_access_mode() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: None,
        ..ext4()
    }
}
fn mount_with(fs: &str, flags: &[&str], group: &str) -> csi::VolumeCapability {
    let mut c = mount_cap(fs);
    c.access_type = Some(csi::volume_capability::AccessType::Mount(
        csi::volume_capability::MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: group.into(),
        },
    ));
    c
}

fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

fn vol(name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    create_req(name, bytes, cap)
}

fn with_params(mut r: csi::CreateVolumeRequest, kv: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    r.parameters = params(kv);
    r
}

fn requisite(node: &str) -> Option<csi::TopologyRequirement> {
    Some(csi::TopologyRequirement {
        requisite: vec![topology(node)],
        preferred: vec![],
    })
}

fn topology(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(berth::service::TOPOLOGY_KEY.to_string(), node.to_string())]),
    }
}

fn get_snap(id: &str) -> csi::GetSnapshotRequest {
    csi::GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    }
}

fn ctl_publish(
    id: &str,
    node: &str,
    cap: csi::VolumeCapability,
    ro: bool,
) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        readonly: ro,
        ..Default::default()
    }
}

fn ctl_unpublish(id: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

fn modify(id: &str, kv: &[(&str, &str)]) -> csi::ControllerModifyVolumeRequest {
    csi::ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: params(kv),
        ..Default::default()
    }
}

fn stats(id: &str, path: &Path) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path_str(path),
        ..Default::default()
    }
}

fn node_expand(
    id: &str,
    path: &Path,
    r: Option<csi::CapacityRange>,
) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path_str(path),
        capacity_range: r,
        ..Default::default()
    }
}

fn capacity_req(caps: Vec<csi::VolumeCapability>) -> csi::GetCapacityRequest {
    csi::GetCapacityRequest {
        volume_capabilities: caps,
        ..Default::default()
    }
}

fn validate(id: &str, caps: Vec<csi::VolumeCapability>) -> csi::ValidateVolumeCapabilitiesRequest {
    csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

// ---- fixtures and observations -----------------------------------------------------------

async fn capacity(ctl: &Ctl) -> i64 {
    ctl.clone()
        .get_capacity(capacity_req(vec![]))
        .await
        .expect("GetCapacity")
        .into_inner()
        .available_capacity
}

async fn delete_all(ctl: &Ctl) {
    for id in list_snapshot_ids(ctl).await {
        delete_snapshot(ctl, &id).await;
    }
    for id in list_volume_ids(ctl).await {
        delete_volume(ctl, &id).await;
    }
}

fn volume_images(d: &Driver) -> usize {
    d.pool_files()
        .iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("volumes")))
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .count()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Writes `data` at `offset` of an existing file without truncating it.
fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn errno_of_write(path: &Path) -> Option<i32> {
    std::fs::write(path, b"x")
        .err()
        .and_then(|e| e.raw_os_error())
}

// ---- Identity ----------------------------------------------------------------------------

/// spec.md "GetPluginInfo", "GetPluginCapabilities", "Probe", "ControllerGetCapabilities",
/// "NodeGetCapabilities", "NodeGetInfo", "GroupControllerGetCapabilities": the read-only
/// discovery RPCs answer OK with what berth implements; the socket is private (0600).
#[tokio::test(flavor = "multi_thread")]
async fn identity_and_capabilities() {
    let d = Driver::start().await;
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    let mut id = d.identity().await;
    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    // "It MUST be 63 characters or less, beginning and ending with an alphanumeric character
    // ([a-z0-9A-Z]) with dashes (-), dots (.), and alphanumerics between."
    let n = info.name.as_bytes();
    assert!(
        !n.is_empty()
            && n.len() <= 63
            && n[0].is_ascii_alphanumeric()
            && n[n.len() - 1].is_ascii_alphanumeric()
            && n.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.'),
        "plugin name {:?} is not domain notation",
        info.name
    );
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    use csi::plugin_capability::{
        Type as PType, service::Type as Svc, volume_expansion::Type as Exp,
    };
    let caps = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let mut services = BTreeSet::new();
    let mut expansion = Vec::new();
    for c in caps {
        match c.r#type.expect("capability type") {
            PType::Service(s) => {
                services.insert(s.r#type);
            }
            PType::VolumeExpansion(e) => expansion.push(e.r#type),
        }
    }
    assert_eq!(
        services,
        BTreeSet::from([
            Svc::ControllerService as i32,
            Svc::GroupControllerService as i32,
            Svc::SnapshotMetadataService as i32,
            Svc::VolumeAccessibilityConstraints as i32
        ])
    );
    assert_eq!(expansion, vec![Exp::Online as i32]);

    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true), "Probe of a healthy plugin");

    use csi::controller_service_capability::{Type as CType, rpc::Type as CRpc};
    let ctl_caps: BTreeSet<i32> = d
        .controller()
        .await
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type.expect("type") {
            CType::Rpc(r) => r.r#type,
        })
        .collect();
    let want: BTreeSet<i32> = [
        CRpc::CreateDeleteVolume,
        CRpc::PublishUnpublishVolume,
        CRpc::ListVolumes,
        CRpc::GetCapacity,
        CRpc::CreateDeleteSnapshot,
        CRpc::ListSnapshots,
        CRpc::CloneVolume,
        CRpc::PublishReadonly,
        CRpc::ExpandVolume,
        CRpc::ListVolumesPublishedNodes,
        CRpc::VolumeCondition,
        CRpc::GetVolume,
        CRpc::SingleNodeMultiWriter,
        CRpc::ModifyVolume,
        CRpc::GetSnapshot,
    ]
    .into_iter()
    .map(|t| t as i32)
    .collect();
    assert_eq!(ctl_caps, want, "controller capabilities");

    use csi::node_service_capability::{Type as NType, rpc::Type as NRpc};
    let mut node = d.node().await;
    let node_caps: BTreeSet<i32> = node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type.expect("type") {
            NType::Rpc(r) => r.r#type,
        })
        .collect();
    let want: BTreeSet<i32> = [
        NRpc::StageUnstageVolume,
        NRpc::GetVolumeStats,
        NRpc::ExpandVolume,
        NRpc::VolumeCondition,
        NRpc::SingleNodeMultiWriter,
    ]
    .into_iter()
    .map(|t| t as i32)
    .collect();
    assert_eq!(node_caps, want, "node capabilities");

    let info = node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE_ID);
    assert!(info.max_volumes_per_node > 0);
    assert_eq!(info.accessible_topology, Some(topology(NODE_ID)));

    use csi::group_controller_service_capability::{Type as GType, rpc::Type as GRpc};
    let group_caps: Vec<i32> = d
        .group()
        .await
        .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type.expect("type") {
            GType::Rpc(r) => r.r#type,
        })
        .collect();
    assert_eq!(
        group_caps,
        vec![GRpc::CreateDeleteGetVolumeGroupSnapshot as i32]
    );
    d.assert_clean();
}

/// spec.md "Probe Errors": Plugin not healthy → 9 FAILED_PRECONDITION, here a pool that no
/// longer takes a write (its scratch directory made immutable behind the driver's back); ready
/// again once it does.
#[tokio::test(flavor = "multi_thread")]
async fn probe_reports_an_unwritable_pool() {
    let d = Driver::start().await;
    let mut id = d.identity().await;
    let tmp = d.pool_root().join("berth/tmp");
    let chattr = |flag: &str| {
        let ok = std::process::Command::new("chattr")
            .arg(flag)
            .arg(&tmp)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chattr {flag} {}", tmp.display());
    };
    chattr("+i");
    let sick = id.probe(csi::ProbeRequest {}).await;
    chattr("-i");
    let err = sick.expect_err("Probe of a pool that takes no write");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(!err.message().is_empty());
    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true), "ready again");
    d.assert_clean();
}

// ---- CreateVolume / DeleteVolume ---------------------------------------------------------

/// spec.md "CreateVolume" (idempotency by name), "CreateVolume Errors" (every row),
/// "DeleteVolume" (unknown id → OK) and "Error Scheme" (missing/invalid fields).
#[tokio::test(flavor = "multi_thread")]
async fn create_volume_and_delete_volume() {
    let d = Driver::start().await;
    let ctl = d.controller().await;

    // Success: the response describes what was asked for.
    let v = create_volume(&ctl, vol("cv-ext4", 64 * MIB, ext4())).await;
    assert_eq!(v.capacity_bytes, 64 * MIB);
    assert!(v.volume_id.starts_with("vol-"));
    assert_eq!(v.accessible_topology, vec![topology(NODE_ID)]);
    assert_eq!(
        v.volume_context.get("fsType").map(String::as_str),
        Some("ext4")
    );
    assert!(v.content_source.is_none());
    // Idempotency: the same name answers the same volume, and no second one exists.
    let again = create_volume(&ctl, vol("cv-ext4", 64 * MIB, ext4())).await;
    assert_eq!(again, v, "a repeated CreateVolume answers the same volume");
    assert_eq!(list_volume_ids(&ctl).await, vec![v.volume_id.clone()]);
    assert_eq!(volume_images(&d), 1);

    // Sizes: none → 1 GiB default; rounded up to 1 MiB; xfs at least 300 MiB; a limit only.
    let sized = |name: &str, cap: csi::VolumeCapability, r: Option<csi::CapacityRange>| {
        let mut req = vol(name, 0, cap);
        req.capacity_range = r;
        req
    };
    let sizes = [
        (sized("cv-default", block(), None), GIB),
        (sized("cv-zero-range", block(), range(0, 0)), GIB),
        (sized("cv-round", block(), range(MIB + 1, 0)), 2 * MIB),
        (sized("cv-xfs-min", xfs(), range(MIB, 0)), 300 * MIB),
        (
            sized("cv-limit", block(), range(0, 100 * MIB + 5)),
            100 * MIB,
        ),
        (
            sized("cv-exact", block(), range(10 * MIB, 10 * MIB)),
            10 * MIB,
        ),
    ];
    for (req, want) in sizes {
        let name = req.name.clone();
        let got = create_volume(&ctl, req).await;
        assert_eq!(got.capacity_bytes, want, "{name}");
        ctl.clone()
            .delete_volume(delete_volume_req(&got.volume_id))
            .await
            .unwrap();
    }

    let src_snap = create_snapshot(&ctl, "cv-snap", &v.volume_id).await;
    let block_vol = create_volume(&ctl, vol("cv-block", 16 * MIB, block())).await;

    let mut cases = Vec::new();
    let same = || vol("cv-ext4", 64 * MIB, ext4());
    // "Volume already exists but is incompatible" → 6 ALREADY_EXISTS, per field the row names.
    let mut bigger = same();
    bigger.capacity_range = range(128 * MIB, 0);
    cases.push(case(
        "CreateVolume Errors: exists, capacity_range required above its size → ALREADY_EXISTS",
        Code::AlreadyExists,
        rpc!(ctl, create_volume, bigger),
    ));
    let mut smaller_limit = same();
    smaller_limit.capacity_range = range(0, 32 * MIB);
    cases.push(case(
        "CreateVolume Errors: exists, capacity_range limit below its size → ALREADY_EXISTS",
        Code::AlreadyExists,
        rpc!(ctl, create_volume, smaller_limit),
    ));
    cases.push(case(
        "CreateVolume Errors: exists, volume_capabilities xfs instead of ext4 → ALREADY_EXISTS",
        Code::AlreadyExists,
        rpc!(ctl, create_volume, vol("cv-ext4", 64 * MIB, xfs())),
    ));
    cases.push(case(
        "CreateVolume Errors: exists, volume_capabilities block instead of mount → ALREADY_EXISTS",
        Code::AlreadyExists,
        rpc!(ctl, create_volume, vol("cv-ext4", 64 * MIB, block())),
    ));
    cases.push(case(
        "CreateVolume Errors: exists, parameters differ → ALREADY_EXISTS",
        Code::AlreadyExists,
        rpc!(
            ctl,
            create_volume,
            with_params(same(), &[("preallocate", "true")])
        ),
    ));
    cases.push(case(
        "CreateVolume Errors: exists, volume_content_source differs → ALREADY_EXISTS",
        Code::AlreadyExists,
        rpc!(
            ctl,
            create_volume,
            from_snapshot(same(), &src_snap.snapshot_id)
        ),
    ));
    let mut elsewhere = same();
    elsewhere.accessibility_requirements = requisite("node-2");
    cases.push(case(
        "CreateVolume Errors: exists, accessibility_requirements exclude it → ALREADY_EXISTS",
        Code::AlreadyExists,
        rpc!(ctl, create_volume, elsewhere),
    ));
    // Compatible repeats are OK.
    let mut fits = same();
    fits.capacity_range = range(32 * MIB, 0);
    cases.push(case(
        "CreateVolume: exists and satisfies a smaller required_bytes → OK",
        Code::Ok,
        rpc!(ctl, create_volume, fits),
    ));
    cases.push(case(
        "CreateVolume: exists, fstype from parameters instead of the capability → OK",
        Code::Ok,
        rpc!(
            ctl,
            create_volume,
            with_params(
                vol("cv-ext4", 64 * MIB, mount_cap("")),
                &[("csi.storage.k8s.io/fstype", "ext4")]
            )
        ),
    ));
    let mut here = same();
    here.accessibility_requirements = requisite(NODE_ID);
    let mut preferred = same();
    preferred.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![topology("node-2")],
    });
    cases.push(case(
        "CreateVolume: only a preference for another node → OK",
        Code::Ok,
        rpc!(ctl, create_volume, preferred),
    ));
    cases.push(case(
        "CreateVolume: requisite topology names this node → OK",
        Code::Ok,
        rpc!(ctl, create_volume, here),
    ));
    // "Unable to provision in accessible_topology" → 8 RESOURCE_EXHAUSTED.
    let mut nowhere = vol("cv-nowhere", MIB, block());
    nowhere.accessibility_requirements = requisite("node-2");
    cases.push(case(
        "CreateVolume Errors: Unable to provision in accessible_topology → RESOURCE_EXHAUSTED",
        Code::ResourceExhausted,
        rpc!(ctl, create_volume, nowhere),
    ));
    // "Unsupported capacity_range" → 11 OUT_OF_RANGE.
    let mut inverted = vol("cv-inverted", 10 * MIB, block());
    inverted.capacity_range = range(10 * MIB, 5 * MIB);
    cases.push(case(
        "CreateVolume Errors: Unsupported capacity_range (required > limit) → OUT_OF_RANGE",
        Code::OutOfRange,
        rpc!(ctl, create_volume, inverted),
    ));
    let mut xfs_small = vol("cv-xfs-small", 0, xfs());
    xfs_small.capacity_range = range(0, 100 * MIB);
    cases.push(case(
        "CreateVolume Errors: Unsupported capacity_range (limit below xfs minimum) → OUT_OF_RANGE",
        Code::OutOfRange,
        rpc!(ctl, create_volume, xfs_small),
    ));
    let mut unaligned = vol("cv-unaligned", MIB + 1, block());
    unaligned.capacity_range = range(MIB + 1, MIB + 2);
    cases.push(case(
        "CreateVolume Errors: Unsupported capacity_range (no MiB multiple inside) → OUT_OF_RANGE",
        Code::OutOfRange,
        rpc!(ctl, create_volume, unaligned),
    ));
    let mut small_restore =
        from_snapshot(vol("cv-small-restore", 0, ext4()), &src_snap.snapshot_id);
    small_restore.capacity_range = range(0, 32 * MIB);
    cases.push(case(
        "CreateVolume Errors: Unsupported capacity_range (limit < source snapshot) → OUT_OF_RANGE",
        Code::OutOfRange,
        rpc!(ctl, create_volume, small_restore),
    ));
    // "Source does not exist" → 5 NOT_FOUND.
    cases.push(case(
        "CreateVolume Errors: Source does not exist (snapshot) → NOT_FOUND",
        Code::NotFound,
        rpc!(
            ctl,
            create_volume,
            from_snapshot(vol("cv-nosnap", 64 * MIB, ext4()), NO_SNAP)
        ),
    ));
    cases.push(case(
        "CreateVolume Errors: Source does not exist (volume) → NOT_FOUND",
        Code::NotFound,
        rpc!(
            ctl,
            create_volume,
            from_volume(vol("cv-novol", 64 * MIB, ext4()), NO_VOL)
        ),
    ));
    cases.push(case(
        "CreateVolume Errors: Source does not exist (snapshot id ../../etc) → NOT_FOUND",
        Code::NotFound,
        rpc!(
            ctl,
            create_volume,
            from_snapshot(vol("cv-evil-snap", 64 * MIB, ext4()), "../../etc")
        ),
    ));
    cases.push(case(
        "CreateVolume Errors: Source does not exist (volume id vol-../x) → NOT_FOUND",
        Code::NotFound,
        rpc!(
            ctl,
            create_volume,
            from_volume(vol("cv-evil-vol", 64 * MIB, ext4()), "vol-../x")
        ),
    ));
    // "Source incompatible or not supported" → 3 INVALID_ARGUMENT.
    cases.push(case(
        "CreateVolume Errors: Source incompatible (block from ext4 snapshot) → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            from_snapshot(
                vol("cv-snap-to-block", 64 * MIB, block()),
                &src_snap.snapshot_id
            )
        ),
    ));
    cases.push(case(
        "CreateVolume Errors: Source incompatible (xfs clone of an ext4 volume) → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            from_volume(vol("cv-clone-to-xfs", 512 * MIB, xfs()), &v.volume_id)
        ),
    ));
    cases.push(case(
        "CreateVolume Errors: Source incompatible (ext4 clone of block) → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            from_volume(
                vol("cv-block-to-ext4", 64 * MIB, ext4()),
                &block_vol.volume_id
            )
        ),
    ));
    // "Error Scheme": missing required fields and invalid ones → 3 INVALID_ARGUMENT.
    cases.push(missing(
        "CreateVolume",
        "name",
        rpc!(ctl, create_volume, vol("", MIB, block())),
    ));
    for (what, name) in [
        ("U+0001", "bad\u{1}name"),
        ("U+007F", "bad\u{7f}"),
        ("U+009F", "bad\u{9f}"),
        ("U+000B", "a\u{b}b"),
        ("U+001F", "a\u{1f}"),
    ] {
        cases.push(case(
            format!("Error Scheme: CreateVolume name with banned {what} → INVALID_ARGUMENT"),
            Code::InvalidArgument,
            rpc!(ctl, create_volume, vol(name, MIB, block())),
        ));
    }
    let mut no_caps = vol("cv-nocaps", MIB, block());
    no_caps.volume_capabilities.clear();
    cases.push(missing(
        "CreateVolume",
        "volume_capabilities",
        rpc!(ctl, create_volume, no_caps),
    ));
    cases.push(missing(
        "CreateVolume capability",
        "access_type",
        rpc!(ctl, create_volume, vol("cv-notype", MIB, no_access_type())),
    ));
    cases.push(missing(
        "CreateVolume capability",
        "access_mode",
        rpc!(ctl, create_volume, vol("cv-nomode", MIB, no_access_mode())),
    ));
    cases.push(case(
        "Error Scheme: CreateVolume access mode UNKNOWN → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            vol("cv-unknown-mode", MIB, moded(block(), Mode::Unknown))
        ),
    ));
    for m in [
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
        Mode::MultiNodeMultiWriter,
    ] {
        cases.push(case(
            format!(
                "CreateVolume: unsupported capability {} → INVALID_ARGUMENT",
                m.as_str_name()
            ),
            Code::InvalidArgument,
            rpc!(ctl, create_volume, vol("cv-multi", MIB, moded(block(), m))),
        ));
    }
    cases.push(case(
        "CreateVolume: unsupported fs_type btrfs → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            vol("cv-btrfs", 64 * MIB, mount_cap("btrfs"))
        ),
    ));
    cases.push(case(
        "CreateVolume: mount flag with a comma → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            vol("cv-flags", 64 * MIB, mount_with("ext4", &["ro,exec"], ""))
        ),
    ));
    cases.push(case(
        "CreateVolume: mount flag with a space → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            vol("cv-flags2", 64 * MIB, mount_with("ext4", &["a b"], ""))
        ),
    ));
    cases.push(case(
        "CreateVolume: volume_mount_group (unsupported) → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            vol("cv-group", 64 * MIB, mount_with("ext4", &[], "1000"))
        ),
    ));
    let mut mixed = vol("cv-mixed", 64 * MIB, ext4());
    mixed.volume_capabilities.push(block());
    cases.push(case(
        "CreateVolume: capabilities mixing block and mount → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(ctl, create_volume, mixed),
    ));
    cases.push(case(
        "CreateVolume: unknown parameter → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            with_params(vol("cv-param", MIB, block()), &[("iops", "3")])
        ),
    ));
    cases.push(case(
        "CreateVolume: parameter fstype btrfs → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            with_params(
                vol("cv-param2", 64 * MIB, mount_cap("")),
                &[("csi.storage.k8s.io/fstype", "btrfs")]
            )
        ),
    ));
    cases.push(case(
        "CreateVolume: parameter preallocate=yes → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            ctl,
            create_volume,
            with_params(vol("cv-param3", MIB, block()), &[("preallocate", "yes")])
        ),
    ));
    let mut bad_mutable = vol("cv-mutable", MIB, block());
    bad_mutable.mutable_parameters = params(&[("iops", "100")]);
    cases.push(case(
        "CreateVolume: unknown mutable_parameters key → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(ctl, create_volume, bad_mutable),
    ));
    let mut negative = vol("cv-negative", MIB, block());
    negative.capacity_range = range(-1, 0);
    cases.push(case(
        "CreateVolume: negative required_bytes → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(ctl, create_volume, negative),
    ));
    let mut empty_source = vol("cv-empty-source", 64 * MIB, ext4());
    empty_source = from_snapshot(empty_source, "");
    cases.push(missing(
        "CreateVolume SnapshotSource",
        "snapshot_id",
        rpc!(ctl, create_volume, empty_source),
    ));
    // Names may hold the common whitespace the spec allows.
    cases.push(case(
        "CreateVolume: name with tab/newline/CR (allowed) → OK",
        Code::Ok,
        rpc!(ctl, create_volume, vol("ws\t\n\rname", MIB, block())),
    ));
    // DeleteVolume.
    cases.push(case(
        "DeleteVolume: unknown well-formed id → OK",
        Code::Ok,
        rpc!(ctl, delete_volume, delete_volume_req(NO_VOL)),
    ));
    cases.push(missing(
        "DeleteVolume",
        "volume_id",
        rpc!(ctl, delete_volume, delete_volume_req("")),
    ));
    cases.push(case(
        "DeleteVolume: existing volume → OK",
        Code::Ok,
        rpc!(ctl, delete_volume, delete_volume_req(&block_vol.volume_id)),
    ));
    cases.push(case(
        "DeleteVolume: repeated → OK",
        Code::Ok,
        rpc!(ctl, delete_volume, delete_volume_req(&block_vol.volume_id)),
    ));
    run("CreateVolume/DeleteVolume", cases).await;

    // Nothing the failing cases asked for exists, and the compatible repeats made nothing new.
    let mut ids = list_volume_ids(&ctl).await;
    ids.sort();
    let ws = berth::storage::VolumeId::for_name("ws\t\n\rname").to_string();
    let mut want = vec![v.volume_id.clone(), ws];
    want.sort();
    assert_eq!(ids, want, "only the created volumes exist");
    assert_eq!(volume_images(&d), 2);

    // Restore and clone: content_source is reported, and repeats are idempotent.
    let restore = from_snapshot(vol("cv-restore", 64 * MIB, ext4()), &src_snap.snapshot_id);
    let r1 = create_volume(&ctl, restore.clone()).await;
    assert_eq!(r1.content_source, restore.volume_content_source);
    assert_eq!(create_volume(&ctl, restore).await, r1);
    let clone = from_volume(vol("cv-clone", 128 * MIB, ext4()), &v.volume_id);
    let c1 = create_volume(&ctl, clone.clone()).await;
    assert_eq!(
        c1.capacity_bytes,
        128 * MIB,
        "a clone may be larger than its source"
    );
    assert_eq!(c1.content_source, clone.volume_content_source);
    assert_eq!(create_volume(&ctl, clone).await, c1);
    assert_eq!(volume_images(&d), 4);

    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- GetCapacity and running out of space ------------------------------------------------

/// spec.md "GetCapacity" (available_capacity, minimum/maximum_volume_size; zero for a
/// topology or capability the plugin cannot serve), "CreateVolume" over the space left
/// (berth: 8 RESOURCE_EXHAUSTED), "CreateSnapshot Errors" / "CreateVolumeGroupSnapshot
/// Errors": Not enough space → RESOURCE_EXHAUSTED, with nothing left behind.
#[tokio::test(flavor = "multi_thread")]
async fn capacity_is_reserved_and_exhaustible() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let grp = d.group().await;

    let full = ctl
        .clone()
        .get_capacity(capacity_req(vec![]))
        .await
        .unwrap()
        .into_inner();
    let c0 = full.available_capacity;
    assert!(c0 > 15 * GIB && c0 <= 16 * GIB, "a 16Gi pool offers {c0}");
    assert_eq!(c0 % MIB, 0);
    assert_eq!(full.maximum_volume_size, Some(c0));
    assert_eq!(full.minimum_volume_size, Some(MIB));
    let xfs_cap = ctl
        .clone()
        .get_capacity(capacity_req(vec![xfs()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(xfs_cap.available_capacity, c0);
    assert_eq!(xfs_cap.minimum_volume_size, Some(300 * MIB));
    for (label, req) in [
        (
            "topology of another node",
            csi::GetCapacityRequest {
                accessible_topology: Some(topology("node-2")),
                ..Default::default()
            },
        ),
        (
            "MULTI_NODE_MULTI_WRITER capability",
            capacity_req(vec![moded(block(), Mode::MultiNodeMultiWriter)]),
        ),
    ] {
        let r = ctl.clone().get_capacity(req).await.unwrap().into_inner();
        assert_eq!(r.available_capacity, 0, "GetCapacity for {label}");
    }
    let here = ctl
        .clone()
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(topology(NODE_ID)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        here.available_capacity, c0,
        "GetCapacity for this node's topology"
    );

    // Every byte of a volume's capacity is reserved, though the image is sparse.
    let a = create_volume(&ctl, vol("cap-a", GIB, block())).await;
    let c1 = capacity(&ctl).await;
    assert_eq!(
        c1,
        c0 - GIB,
        "GetCapacity decreases by the new volume's size"
    );

    // A volume with 16 MiB written (straight into its image, as a workload would).
    let data = create_volume(&ctl, vol("cap-data", 64 * MIB, block())).await;
    write_at(
        &d.volume_image(&data.volume_id),
        0,
        &pattern(7, 16 * MIB as usize),
    );
    assert_eq!(capacity(&ctl).await, c1 - 64 * MIB);

    let mut cases = vec![
        case(
            "GetCapacity: capability without access_mode → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(ctl, get_capacity, capacity_req(vec![no_access_mode()])),
        ),
        case(
            "GetCapacity: capability without access_type → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(ctl, get_capacity, capacity_req(vec![no_access_type()])),
        ),
        case(
            "GetCapacity: unknown parameter → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                ctl,
                get_capacity,
                csi::GetCapacityRequest {
                    parameters: params(&[("iops", "3")]),
                    ..Default::default()
                }
            ),
        ),
        case(
            "CreateVolume beyond GetCapacity → RESOURCE_EXHAUSTED",
            Code::ResourceExhausted,
            rpc!(
                ctl,
                create_volume,
                vol("cap-too-big", c1 - 64 * MIB + MIB, block())
            ),
        ),
        case(
            "CreateVolume of i64::MAX bytes → RESOURCE_EXHAUSTED",
            Code::ResourceExhausted,
            rpc!(ctl, create_volume, vol("cap-huge", i64::MAX, block())),
        ),
        case(
            "ControllerExpandVolume beyond GetCapacity → RESOURCE_EXHAUSTED",
            Code::ResourceExhausted,
            rpc!(
                ctl,
                controller_expand_volume,
                expand_req(&a.volume_id, GIB + c1, 0)
            ),
        ),
    ];
    run("capacity: over the limit", std::mem::take(&mut cases)).await;
    assert_eq!(
        list_volume_ids(&ctl).await.len(),
        2,
        "no volume was made past the limit"
    );

    // Fill the pool exactly: what is left is 0, and the snapshot of the 16 MiB the data
    // volume holds does not fit any more.
    let rest = capacity(&ctl).await;
    let filler = create_volume(&ctl, vol("cap-filler", rest, block())).await;
    assert_eq!(capacity(&ctl).await, 0, "the pool is fully reserved");
    cases.push(case(
        "CreateVolume Errors / capacity: 1 MiB in a full pool → RESOURCE_EXHAUSTED",
        Code::ResourceExhausted,
        rpc!(ctl, create_volume, vol("cap-one-more", MIB, block())),
    ));
    cases.push(case(
        "CreateSnapshot Errors: Not enough space to create snapshot → RESOURCE_EXHAUSTED",
        Code::ResourceExhausted,
        rpc!(
            ctl,
            create_snapshot,
            snapshot_req("cap-snap", &data.volume_id)
        ),
    ));
    cases.push(case(
        "CreateVolumeGroupSnapshot Errors: Not enough space → RESOURCE_EXHAUSTED",
        Code::ResourceExhausted,
        rpc!(
            grp,
            create_volume_group_snapshot,
            group_snapshot_req("cap-group", &[&filler.volume_id, &data.volume_id])
        ),
    ));
    cases.push(case(
        "ControllerExpandVolume in a full pool → RESOURCE_EXHAUSTED",
        Code::ResourceExhausted,
        rpc!(
            ctl,
            controller_expand_volume,
            expand_req(&a.volume_id, GIB + MIB, 0)
        ),
    ));
    cases.push(case(
        "CreateSnapshot of a volume with nothing written fits a full pool → OK",
        Code::Ok,
        rpc!(
            ctl,
            create_snapshot,
            snapshot_req("cap-empty-snap", &filler.volume_id)
        ),
    ));
    run("capacity: full pool", cases).await;
    // The failed group snapshot cleaned up after itself (spec: "SP SHOULD also do clean up and
    // make sure no snapshots are leaked").
    let snaps = list_snapshot_ids(&ctl).await;
    assert_eq!(snaps.len(), 1, "only the empty snapshot exists: {snaps:?}");
    assert!(
        !d.pool_files()
            .iter()
            .any(|p| p.starts_with(d.pool_root().join("berth/groups"))),
        "no group record left: {:?}",
        d.pool_files()
    );
    ctl.clone()
        .delete_snapshot(delete_snapshot_req(&snaps[0]))
        .await
        .unwrap();

    // Space freed is offered again; a snapshot reserves what its source had allocated.
    ctl.clone()
        .delete_volume(delete_volume_req(&filler.volume_id))
        .await
        .unwrap();
    assert_eq!(capacity(&ctl).await, rest);
    let sn = create_snapshot(&ctl, "cap-snap", &data.volume_id).await;
    assert_eq!(
        capacity(&ctl).await,
        rest - 16 * MIB,
        "a snapshot reserves its allocation"
    );
    ctl.clone()
        .delete_snapshot(delete_snapshot_req(&sn.snapshot_id))
        .await
        .unwrap();

    delete_all(&ctl).await;
    // XFS frees an unlinked file's blocks in the background (deferred inode inactivation), so
    // the free-space bound may lag a delete for a moment: conservative, and it settles.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = capacity(&ctl).await;
        if c == c0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "everything deleted gives everything back: {c} != {c0}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.assert_clean();
}

// ---- ControllerPublishVolume / ControllerUnpublishVolume --------------------------------

/// spec.md "ControllerPublishVolume Errors" (every row reachable on a single-node plugin),
/// "ControllerUnpublishVolume" (unknown volume or node → OK), "DeleteVolume Errors": Volume in
/// use → FAILED_PRECONDITION, and LIST_VOLUMES_PUBLISHED_NODES / GET_VOLUME's
/// published_node_ids.
#[tokio::test(flavor = "multi_thread")]
async fn controller_publish_and_unpublish() {
    let d = Driver::start_with(Options {
        max_volumes_per_node: Some(2),
        ..Default::default()
    })
    .await;
    let ctl = d.controller().await;
    let info = d
        .node()
        .await
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.max_volumes_per_node, 2,
        "NodeGetInfo reports --max-volumes-per-node"
    );

    let a = create_volume(&ctl, vol("pub-a", 64 * MIB, ext4()))
        .await
        .volume_id;
    let b = create_volume(&ctl, vol("pub-b", 16 * MIB, block()))
        .await
        .volume_id;
    let c = create_volume(&ctl, vol("pub-c", 16 * MIB, block()))
        .await
        .volume_id;

    let cases = vec![
        case(
            "ControllerPublishVolume: success → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&a, NODE_ID, ext4(), false)
            ),
        ),
        case(
            "ControllerPublishVolume: repeated → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&a, NODE_ID, ext4(), false)
            ),
        ),
        case(
            "ControllerPublishVolume Errors: Volume published but is incompatible (readonly) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&a, NODE_ID, ext4(), true)
            ),
        ),
        case(
            "ControllerPublishVolume Errors: Volume published but is incompatible (SINGLE_NODE_READER_ONLY) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(
                    &a,
                    NODE_ID,
                    moded(ext4(), Mode::SingleNodeReaderOnly),
                    false
                )
            ),
        ),
        case(
            "ControllerPublishVolume Errors: Volume published but is incompatible (other access mode, same readonly) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(
                    &a,
                    NODE_ID,
                    moded(ext4(), Mode::SingleNodeMultiWriter),
                    false
                )
            ),
        ),
        case(
            "ControllerPublishVolume Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(NO_VOL, NODE_ID, ext4(), false)
            ),
        ),
        case(
            "ControllerPublishVolume Errors: Volume does not exist (../../etc) → NOT_FOUND",
            Code::NotFound,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish("../../etc", NODE_ID, ext4(), false)
            ),
        ),
        case(
            "ControllerPublishVolume Errors: Node does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&b, "node-2", block(), false)
            ),
        ),
        missing(
            "ControllerPublishVolume",
            "volume_id",
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish("", NODE_ID, block(), false)
            ),
        ),
        missing(
            "ControllerPublishVolume",
            "node_id",
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&b, "", block(), false)
            ),
        ),
        missing(
            "ControllerPublishVolume",
            "volume_capability",
            rpc!(
                ctl,
                controller_publish_volume,
                csi::ControllerPublishVolumeRequest {
                    volume_capability: None,
                    ..ctl_publish(&b, NODE_ID, block(), false)
                }
            ),
        ),
        missing(
            "ControllerPublishVolume capability",
            "access_mode",
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(
                    &b,
                    NODE_ID,
                    csi::VolumeCapability {
                        access_mode: None,
                        ..block()
                    },
                    false
                )
            ),
        ),
        case(
            "ControllerPublishVolume: capability the volume cannot serve (mount on block) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&b, NODE_ID, ext4(), false)
            ),
        ),
        case(
            "ControllerPublishVolume: MULTI_NODE_MULTI_WRITER → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(
                    &b,
                    NODE_ID,
                    moded(block(), Mode::MultiNodeMultiWriter),
                    false
                )
            ),
        ),
        case(
            "ControllerPublishVolume: second volume (max 2) → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&b, NODE_ID, block(), false)
            ),
        ),
        case(
            "ControllerPublishVolume Errors: Max volumes attached → RESOURCE_EXHAUSTED",
            Code::ResourceExhausted,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&c, NODE_ID, block(), false)
            ),
        ),
        case(
            "DeleteVolume Errors: Volume in use (published) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(ctl, delete_volume, delete_volume_req(&a)),
        ),
    ];
    run("ControllerPublishVolume", cases).await;

    let published = |entries: &[csi::list_volumes_response::Entry], id: &str| {
        entries
            .iter()
            .find(|e| e.volume.as_ref().unwrap().volume_id == id)
            .and_then(|e| e.status.clone())
            .expect("ListVolumes entry with status")
            .published_node_ids
    };
    let entries = list_volumes(&ctl).await;
    assert_eq!(published(&entries, &a), vec![NODE_ID.to_string()]);
    assert_eq!(published(&entries, &b), vec![NODE_ID.to_string()]);
    assert_eq!(published(&entries, &c), Vec::<String>::new());
    let got = get_volume(&ctl, &a).await;
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec![NODE_ID.to_string()]
    );

    let cases = vec![
        case(
            "ControllerUnpublishVolume: success → OK",
            Code::Ok,
            rpc!(ctl, controller_unpublish_volume, ctl_unpublish(&a, NODE_ID)),
        ),
        case(
            "ControllerUnpublishVolume: repeated → OK",
            Code::Ok,
            rpc!(ctl, controller_unpublish_volume, ctl_unpublish(&a, NODE_ID)),
        ),
        case(
            "ControllerUnpublishVolume: unknown volume (assumed unpublished) → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_unpublish_volume,
                ctl_unpublish(NO_VOL, NODE_ID)
            ),
        ),
        case(
            "ControllerUnpublishVolume: volume id ../../etc → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_unpublish_volume,
                ctl_unpublish("../../etc", NODE_ID)
            ),
        ),
        case(
            "ControllerUnpublishVolume: unknown node (assumed unpublished) → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_unpublish_volume,
                ctl_unpublish(&b, "node-2")
            ),
        ),
        missing(
            "ControllerUnpublishVolume",
            "volume_id",
            rpc!(ctl, controller_unpublish_volume, ctl_unpublish("", NODE_ID)),
        ),
        case(
            "ControllerUnpublishVolume: empty node_id unpublishes from every node → OK",
            Code::Ok,
            rpc!(ctl, controller_unpublish_volume, ctl_unpublish(&b, "")),
        ),
        case(
            "ControllerPublishVolume: below the maximum again → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&c, NODE_ID, block(), true)
            ),
        ),
        case(
            "ControllerPublishVolume: readonly repeated → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(&c, NODE_ID, block(), true)
            ),
        ),
        case(
            "ControllerPublishVolume Errors: Volume published but is incompatible (READER_ONLY mode instead of the readonly flag) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                ctl,
                controller_publish_volume,
                ctl_publish(
                    &c,
                    NODE_ID,
                    moded(block(), Mode::SingleNodeReaderOnly),
                    false
                )
            ),
        ),
        case(
            "ControllerUnpublishVolume: readonly one → OK",
            Code::Ok,
            rpc!(ctl, controller_unpublish_volume, ctl_unpublish(&c, NODE_ID)),
        ),
    ];
    run("ControllerUnpublishVolume", cases).await;
    for e in list_volumes(&ctl).await {
        let id = e.volume.unwrap().volume_id;
        assert_eq!(
            e.status.unwrap().published_node_ids,
            Vec::<String>::new(),
            "{id} is unpublished"
        );
    }
    assert_eq!(
        get_volume(&ctl, &a)
            .await
            .status
            .unwrap()
            .published_node_ids,
        Vec::<String>::new()
    );
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- ValidateVolumeCapabilities ----------------------------------------------------------

/// spec.md "ValidateVolumeCapabilities": confirmed only if every capability (and parameter) is
/// supported, echoing what was confirmed; otherwise unconfirmed with a message. "Errors":
/// Volume does not exist → NOT_FOUND; missing fields → INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread")]
async fn validate_volume_capabilities() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let fs = create_volume(&ctl, vol("val-ext4", 64 * MIB, ext4()))
        .await
        .volume_id;
    let blk = create_volume(&ctl, vol("val-block", 16 * MIB, block()))
        .await
        .volume_id;

    let confirmed: Vec<(&str, csi::ValidateVolumeCapabilitiesRequest)> = vec![
        ("ext4 volume, ext4 mount", validate(&fs, vec![ext4()])),
        (
            "ext4 volume, mount without fs_type",
            validate(&fs, vec![mount_cap("")]),
        ),
        (
            "ext4 volume, two modes",
            validate(
                &fs,
                vec![
                    ext4(),
                    moded(ext4(), Mode::SingleNodeReaderOnly),
                    moded(ext4(), Mode::SingleNodeMultiWriter),
                ],
            ),
        ),
        (
            "ext4 volume, mount flags",
            validate(&fs, vec![mount_with("ext4", &["noatime", "nodiscard"], "")]),
        ),
        (
            "block volume, block",
            validate(
                &blk,
                vec![block(), moded(block(), Mode::SingleNodeSingleWriter)],
            ),
        ),
        (
            "with volume_context, parameters and mutable_parameters",
            csi::ValidateVolumeCapabilitiesRequest {
                volume_context: params(&[("fsType", "ext4")]),
                parameters: params(&[("csi.storage.k8s.io/fstype", "ext4")]),
                mutable_parameters: params(&[("preallocate", "false")]),
                ..validate(&fs, vec![ext4()])
            },
        ),
    ];
    for (label, req) in confirmed {
        let r = ctl
            .clone()
            .validate_volume_capabilities(req.clone())
            .await
            .unwrap_or_else(|e| panic!("{label}: {e:?}"))
            .into_inner();
        let c = r
            .confirmed
            .unwrap_or_else(|| panic!("{label}: not confirmed: {}", r.message));
        assert_eq!(c.volume_capabilities, req.volume_capabilities, "{label}");
        assert_eq!(c.volume_context, req.volume_context, "{label}");
        assert_eq!(c.parameters, req.parameters, "{label}");
        assert_eq!(c.mutable_parameters, req.mutable_parameters, "{label}");
    }
    let unconfirmed: Vec<(&str, csi::ValidateVolumeCapabilitiesRequest)> = vec![
        ("ext4 volume, xfs mount", validate(&fs, vec![xfs()])),
        ("ext4 volume, block", validate(&fs, vec![block()])),
        (
            "ext4 volume, one of two unsupported",
            validate(&fs, vec![ext4(), block()]),
        ),
        ("block volume, mount", validate(&blk, vec![ext4()])),
        (
            "MULTI_NODE_READER_ONLY",
            validate(&blk, vec![moded(block(), Mode::MultiNodeReaderOnly)]),
        ),
        (
            "volume_mount_group",
            validate(&fs, vec![mount_with("ext4", &[], "1000")]),
        ),
        (
            "unknown parameter",
            csi::ValidateVolumeCapabilitiesRequest {
                parameters: params(&[("iops", "3")]),
                ..validate(&fs, vec![ext4()])
            },
        ),
        (
            "unknown mutable parameter",
            csi::ValidateVolumeCapabilitiesRequest {
                mutable_parameters: params(&[("iops", "3")]),
                ..validate(&fs, vec![ext4()])
            },
        ),
    ];
    for (label, req) in unconfirmed {
        let r = ctl
            .clone()
            .validate_volume_capabilities(req)
            .await
            .unwrap_or_else(|e| panic!("{label}: {e:?}"))
            .into_inner();
        assert!(r.confirmed.is_none(), "{label}: confirmed");
        assert!(
            !r.message.is_empty(),
            "{label}: an unconfirmed answer says why"
        );
    }
    let cases = vec![
        case(
            "ValidateVolumeCapabilities Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(
                ctl,
                validate_volume_capabilities,
                validate(NO_VOL, vec![ext4()])
            ),
        ),
        case(
            "ValidateVolumeCapabilities Errors: Volume does not exist (vol-../x) → NOT_FOUND",
            Code::NotFound,
            rpc!(
                ctl,
                validate_volume_capabilities,
                validate("vol-../x", vec![ext4()])
            ),
        ),
        missing(
            "ValidateVolumeCapabilities",
            "volume_id",
            rpc!(
                ctl,
                validate_volume_capabilities,
                validate("", vec![ext4()])
            ),
        ),
        missing(
            "ValidateVolumeCapabilities",
            "volume_capabilities",
            rpc!(ctl, validate_volume_capabilities, validate(&fs, vec![])),
        ),
        missing(
            "ValidateVolumeCapabilities capability",
            "access_type",
            rpc!(
                ctl,
                validate_volume_capabilities,
                validate(&fs, vec![no_access_type()])
            ),
        ),
        missing(
            "ValidateVolumeCapabilities capability",
            "access_mode",
            rpc!(
                ctl,
                validate_volume_capabilities,
                validate(&fs, vec![no_access_mode()])
            ),
        ),
    ];
    run("ValidateVolumeCapabilities", cases).await;
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- ListVolumes / ListSnapshots pagination ------------------------------------------------

async fn walk_volumes(ctl: &Ctl, max: i32) -> (Vec<String>, usize) {
    let (mut seen, mut pages, mut token) = (Vec::new(), 0, String::new());
    loop {
        let r = ctl
            .clone()
            .list_volumes(csi::ListVolumesRequest {
                max_entries: max,
                starting_token: token.clone(),
            })
            .await
            .expect("ListVolumes page")
            .into_inner();
        assert!(
            max == 0 || r.entries.len() <= max as usize,
            "a page holds at most max_entries"
        );
        seen.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        pages += 1;
        if r.next_token.is_empty() {
            return (seen, pages);
        }
        token = r.next_token;
    }
}

async fn walk_snapshots(ctl: &Ctl, max: i32, source: &str) -> (Vec<String>, usize) {
    let (mut seen, mut pages, mut token) = (Vec::new(), 0, String::new());
    loop {
        let r = ctl
            .clone()
            .list_snapshots(csi::ListSnapshotsRequest {
                max_entries: max,
                starting_token: token.clone(),
                source_volume_id: source.into(),
                ..Default::default()
            })
            .await
            .expect("ListSnapshots page")
            .into_inner();
        assert!(
            max == 0 || r.entries.len() <= max as usize,
            "a page holds at most max_entries"
        );
        seen.extend(
            r.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id),
        );
        pages += 1;
        if r.next_token.is_empty() {
            return (seen, pages);
        }
        token = r.next_token;
    }
}

/// spec.md "ListVolumes" / "ListSnapshots": max_entries pages walk every entry exactly once;
/// "ListVolumes Errors" / "ListSnapshots Errors": Invalid starting_token → 10 ABORTED;
/// ListSnapshots filters by snapshot_id and source_volume_id (no match → empty, OK).
#[tokio::test(flavor = "multi_thread")]
async fn list_volumes_and_snapshots_paginate() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let mut vols = Vec::new();
    for i in 0..7 {
        vols.push(
            create_volume(&ctl, vol(&format!("page-{i}"), MIB, block()))
                .await
                .volume_id,
        );
    }
    let mut want = vols.clone();
    want.sort();
    for max in [1, 2, 3, 7, 8] {
        let (mut seen, pages) = walk_volumes(&ctl, max).await;
        assert_eq!(
            pages,
            7usize.div_ceil(max as usize).max(1),
            "pages at max_entries {max}"
        );
        let n = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(n, seen.len(), "max_entries {max}: an entry came twice");
        assert_eq!(seen, want, "max_entries {max}: every volume once");
    }
    assert_eq!(
        walk_volumes(&ctl, 0).await.1,
        1,
        "max_entries 0 returns everything at once"
    );
    // The token of an entry deleted between pages still continues the walk.
    let first = ctl
        .clone()
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 3,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.next_token, want[2]);
    ctl.clone()
        .delete_volume(delete_volume_req(&want[2]))
        .await
        .unwrap();
    let rest: Vec<String> = ctl
        .clone()
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: first.next_token,
        })
        .await
        .expect("a token whose entry was deleted since")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    assert_eq!(rest, want[3..].to_vec());
    vols.retain(|v| v != &want[2]);
    want.remove(2);

    let mut snaps = Vec::new();
    for i in 0..5 {
        snaps.push(
            create_snapshot(&ctl, &format!("page-snap-{i}"), &vols[i % 2])
                .await
                .snapshot_id,
        );
    }
    let mut want_snaps = snaps.clone();
    want_snaps.sort();
    for max in [1, 2, 5] {
        let (mut seen, _) = walk_snapshots(&ctl, max, "").await;
        let n = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(n, seen.len(), "max_entries {max}: a snapshot came twice");
        assert_eq!(seen, want_snaps, "max_entries {max}: every snapshot once");
    }
    let (mut of_first, _) = walk_snapshots(&ctl, 2, &vols[0]).await;
    of_first.sort();
    let mut want_first = vec![snaps[0].clone(), snaps[2].clone(), snaps[4].clone()];
    want_first.sort();
    assert_eq!(of_first, want_first, "source_volume_id filter with paging");
    for (label, req, want) in [
        (
            "snapshot_id filter",
            csi::ListSnapshotsRequest {
                snapshot_id: snaps[3].clone(),
                ..Default::default()
            },
            vec![snaps[3].clone()],
        ),
        (
            "unknown snapshot_id",
            csi::ListSnapshotsRequest {
                snapshot_id: NO_SNAP.into(),
                ..Default::default()
            },
            vec![],
        ),
        (
            "snapshot_id snap-../x",
            csi::ListSnapshotsRequest {
                snapshot_id: "snap-../x".into(),
                ..Default::default()
            },
            vec![],
        ),
        (
            "unknown source_volume_id",
            csi::ListSnapshotsRequest {
                source_volume_id: NO_VOL.into(),
                ..Default::default()
            },
            vec![],
        ),
        (
            "snapshot_id of another source",
            csi::ListSnapshotsRequest {
                snapshot_id: snaps[1].clone(),
                source_volume_id: vols[0].clone(),
                ..Default::default()
            },
            vec![],
        ),
    ] {
        let got: Vec<String> = ctl
            .clone()
            .list_snapshots(req)
            .await
            .unwrap_or_else(|e| panic!("ListSnapshots {label}: {e:?}"))
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.snapshot.unwrap().snapshot_id)
            .collect();
        assert_eq!(got, want, "ListSnapshots {label}");
    }

    let lv = |token: &str, max: i32| csi::ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    };
    let ls = |token: &str| csi::ListSnapshotsRequest {
        starting_token: token.into(),
        ..Default::default()
    };
    let cases = vec![
        case(
            "ListVolumes Errors: Invalid starting_token (garbage) → ABORTED",
            Code::Aborted,
            rpc!(ctl, list_volumes, lv("bogus", 2)),
        ),
        case(
            "ListVolumes Errors: Invalid starting_token (a snapshot id) → ABORTED",
            Code::Aborted,
            rpc!(ctl, list_volumes, lv(&snaps[0], 2)),
        ),
        case(
            "ListVolumes Errors: Invalid starting_token (../../etc) → ABORTED",
            Code::Aborted,
            rpc!(ctl, list_volumes, lv("../../etc", 0)),
        ),
        case(
            "ListVolumes: negative max_entries → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(ctl, list_volumes, lv("", -1)),
        ),
        case(
            "ListSnapshots Errors: Invalid starting_token (garbage) → ABORTED",
            Code::Aborted,
            rpc!(ctl, list_snapshots, ls("bogus")),
        ),
        case(
            "ListSnapshots Errors: Invalid starting_token (a volume id) → ABORTED",
            Code::Aborted,
            rpc!(ctl, list_snapshots, ls(&vols[0])),
        ),
        case(
            "ListSnapshots: negative max_entries → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                ctl,
                list_snapshots,
                csi::ListSnapshotsRequest {
                    max_entries: -1,
                    ..Default::default()
                }
            ),
        ),
    ];
    run("ListVolumes/ListSnapshots", cases).await;
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- CreateSnapshot / DeleteSnapshot / GetSnapshot ---------------------------------------

/// spec.md "CreateSnapshot" (idempotency by name, ready_to_use), "CreateSnapshot Errors":
/// Snapshot already exists but is incompatible → ALREADY_EXISTS; "DeleteSnapshot" (unknown id
/// → OK); "GetSnapshot Errors": Snapshot does not exist → NOT_FOUND; "DeleteVolume Errors" /
/// "DeleteSnapshot Errors": berth's snapshots are independent of their volume and of restores,
/// so neither "in use" row applies (both deletes → OK).
#[tokio::test(flavor = "multi_thread")]
async fn snapshots() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let v = create_volume(&ctl, vol("snap-src", 64 * MIB, ext4()))
        .await
        .volume_id;
    let v2 = create_volume(&ctl, vol("snap-src2", 16 * MIB, block()))
        .await
        .volume_id;

    let s1 = create_snapshot(&ctl, "s1", &v).await;
    assert!(s1.snapshot_id.starts_with("snap-"));
    assert_eq!(s1.source_volume_id, v);
    assert_eq!(s1.size_bytes, 64 * MIB);
    assert!(s1.ready_to_use, "reflink snapshots are usable at once");
    assert!(s1.creation_time.is_some_and(|t| t.seconds > 0));
    assert!(s1.group_snapshot_id.is_empty());
    assert_eq!(
        create_snapshot(&ctl, "s1", &v).await,
        s1,
        "a repeated CreateSnapshot answers the same snapshot"
    );
    assert_eq!(
        list_snapshot_ids(&ctl).await,
        vec![s1.snapshot_id.clone()],
        "no second snapshot"
    );
    let got = ctl
        .clone()
        .get_snapshot(get_snap(&s1.snapshot_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.snapshot,
        Some(s1.clone()),
        "GetSnapshot answers what CreateSnapshot did"
    );

    let with_meta = csi::CreateSnapshotRequest {
        parameters: params(&[
            ("csi.storage.k8s.io/volumesnapshot/name", "snap"),
            ("csi.storage.k8s.io/volumesnapshot/namespace", "db"),
            (
                "csi.storage.k8s.io/volumesnapshotcontent/name",
                "snapcontent-1",
            ),
        ]),
        ..snapshot_req("s-meta", &v2)
    };
    let cases = vec![
        case(
            "CreateSnapshot Errors: Snapshot already exists but is incompatible (other source) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(ctl, create_snapshot, snapshot_req("s1", &v2)),
        ),
        case(
            "CreateSnapshot: external-snapshotter metadata parameters → OK",
            Code::Ok,
            rpc!(ctl, create_snapshot, with_meta),
        ),
        case(
            "CreateSnapshot: unknown parameter → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                ctl,
                create_snapshot,
                csi::CreateSnapshotRequest {
                    parameters: params(&[("type", "full")]),
                    ..snapshot_req("s-param", &v)
                }
            ),
        ),
        missing(
            "CreateSnapshot",
            "name",
            rpc!(ctl, create_snapshot, snapshot_req("", &v)),
        ),
        case(
            "Error Scheme: CreateSnapshot name with banned U+0007 → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(ctl, create_snapshot, snapshot_req("bell\u{7}", &v)),
        ),
        missing(
            "CreateSnapshot",
            "source_volume_id",
            rpc!(ctl, create_snapshot, snapshot_req("s-nosrc", "")),
        ),
        case(
            "CreateSnapshot: source volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(ctl, create_snapshot, snapshot_req("s-novol", NO_VOL)),
        ),
        case(
            "CreateSnapshot: source volume id ../../etc → NOT_FOUND",
            Code::NotFound,
            rpc!(ctl, create_snapshot, snapshot_req("s-evil", "../../etc")),
        ),
        case(
            "GetSnapshot Errors: Snapshot does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(ctl, get_snapshot, get_snap(NO_SNAP)),
        ),
        case(
            "GetSnapshot Errors: Snapshot does not exist (snap-../x) → NOT_FOUND",
            Code::NotFound,
            rpc!(ctl, get_snapshot, get_snap("snap-../x")),
        ),
        case(
            "GetSnapshot Errors: Snapshot does not exist (a volume id) → NOT_FOUND",
            Code::NotFound,
            rpc!(ctl, get_snapshot, get_snap(&v)),
        ),
        missing(
            "GetSnapshot",
            "snapshot_id",
            rpc!(ctl, get_snapshot, get_snap("")),
        ),
        case(
            "DeleteSnapshot: unknown id → OK",
            Code::Ok,
            rpc!(ctl, delete_snapshot, delete_snapshot_req(NO_SNAP)),
        ),
        case(
            "DeleteSnapshot: id snap-../x → OK",
            Code::Ok,
            rpc!(ctl, delete_snapshot, delete_snapshot_req("snap-../x")),
        ),
        missing(
            "DeleteSnapshot",
            "snapshot_id",
            rpc!(ctl, delete_snapshot, delete_snapshot_req("")),
        ),
    ];
    run("CreateSnapshot/GetSnapshot/DeleteSnapshot", cases).await;
    assert_eq!(list_snapshot_ids(&ctl).await.len(), 2, "s1 and s-meta only");

    // Snapshots are independent: the source volume can go while its snapshot lives, and the
    // snapshot can go while a restore of it lives.
    let restored = create_volume(
        &ctl,
        from_snapshot(vol("snap-restore", 64 * MIB, ext4()), &s1.snapshot_id),
    )
    .await;
    let cases = vec![
        case(
            "DeleteVolume with a snapshot (snapshots are independent) → OK",
            Code::Ok,
            rpc!(ctl, delete_volume, delete_volume_req(&v)),
        ),
        case(
            "GetSnapshot after its source volume is gone → OK",
            Code::Ok,
            rpc!(ctl, get_snapshot, get_snap(&s1.snapshot_id)),
        ),
        case(
            "CreateSnapshot retry after its source volume is gone → OK",
            Code::Ok,
            rpc!(ctl, create_snapshot, snapshot_req("s1", &v)),
        ),
        case(
            "DeleteSnapshot Errors: restore of it exists, not 'in use' in berth → OK",
            Code::Ok,
            rpc!(ctl, delete_snapshot, delete_snapshot_req(&s1.snapshot_id)),
        ),
        case(
            "DeleteSnapshot: repeated → OK",
            Code::Ok,
            rpc!(ctl, delete_snapshot, delete_snapshot_req(&s1.snapshot_id)),
        ),
        case(
            "GetSnapshot Errors: deleted snapshot → NOT_FOUND",
            Code::NotFound,
            rpc!(ctl, get_snapshot, get_snap(&s1.snapshot_id)),
        ),
        case(
            "CreateVolume: a retried restore whose snapshot is gone since → OK",
            Code::Ok,
            rpc!(
                ctl,
                create_volume,
                from_snapshot(vol("snap-restore", 64 * MIB, ext4()), &s1.snapshot_id)
            ),
        ),
        case(
            "ControllerGetVolume: the restore outlives its snapshot → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_get_volume,
                get_volume_req(&restored.volume_id)
            ),
        ),
    ];
    run("independent snapshots", cases).await;
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- Group snapshots ---------------------------------------------------------------------

/// spec.md "CreateVolumeGroupSnapshot" (idempotency by name; members carry the group id),
/// "CreateVolumeGroupSnapshot Errors": already exists but is incompatible → ALREADY_EXISTS;
/// "GetVolumeGroupSnapshot Errors": Snapshot list mismatch → INVALID_ARGUMENT, does not exist
/// → NOT_FOUND; "DeleteVolumeGroupSnapshot Errors": Snapshot list mismatch → INVALID_ARGUMENT
/// (and nothing deleted), unknown id → OK; "DeleteSnapshot Errors": Snapshot is part of a
/// group → INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread")]
async fn group_snapshots() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let grp = d.group().await;
    let g1 = create_volume(&ctl, vol("grp-data", 64 * MIB, ext4()))
        .await
        .volume_id;
    let g2 = create_volume(&ctl, vol("grp-wal", 16 * MIB, block()))
        .await
        .volume_id;
    let g3 = create_volume(&ctl, vol("grp-other", 16 * MIB, block()))
        .await
        .volume_id;
    // One member is staged and mounted, so the cut freezes and thaws it.
    let target = stage_and_publish(&d, &g1, &ext4(), "grp-data").await;
    write_pattern(&target.join("f"), 1, 4096);

    let g = grp
        .clone()
        .create_volume_group_snapshot(group_snapshot_req("grp", &[&g1, &g2]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .expect("group_snapshot is REQUIRED");
    assert!(g.group_snapshot_id.starts_with("group-"));
    assert!(g.ready_to_use);
    assert!(g.creation_time.is_some());
    assert_eq!(g.snapshots.len(), 2);
    let mut members: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    members.sort();
    let sources: BTreeSet<&str> = g
        .snapshots
        .iter()
        .map(|s| s.source_volume_id.as_str())
        .collect();
    assert_eq!(sources, BTreeSet::from([g1.as_str(), g2.as_str()]));
    for s in &g.snapshots {
        assert_eq!(
            s.group_snapshot_id, g.group_snapshot_id,
            "members name their group"
        );
        assert!(s.ready_to_use);
    }
    write_pattern(&target.join("after"), 2, 4096); // thawed: writes go through
    for ids in [[&g1, &g2], [&g2, &g1]] {
        let again = grp
            .clone()
            .create_volume_group_snapshot(group_snapshot_req("grp", &[ids[0], ids[1]]))
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap();
        assert_eq!(
            again.group_snapshot_id, g.group_snapshot_id,
            "repeated CreateVolumeGroupSnapshot"
        );
        let mut again_members: Vec<String> = again
            .snapshots
            .iter()
            .map(|s| s.snapshot_id.clone())
            .collect();
        again_members.sort();
        assert_eq!(again_members, members);
    }
    let mut all = list_snapshot_ids(&ctl).await;
    all.sort();
    assert_eq!(all, members, "no snapshots besides the group's");

    let gid = g.group_snapshot_id.clone();
    let one = vec![members[0].clone()];
    let wrong = vec![members[0].clone(), NO_SNAP.to_string()];
    let cases = vec![
        case(
            "CreateVolumeGroupSnapshot Errors: already exists but is incompatible (source_volume_ids) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                grp,
                create_volume_group_snapshot,
                group_snapshot_req("grp", &[&g1, &g3])
            ),
        ),
        case(
            "CreateVolumeGroupSnapshot Errors: already exists but is incompatible (fewer volumes) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                grp,
                create_volume_group_snapshot,
                group_snapshot_req("grp", &[&g1])
            ),
        ),
        case(
            "CreateVolumeGroupSnapshot: unknown parameter → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                grp,
                create_volume_group_snapshot,
                csi::CreateVolumeGroupSnapshotRequest {
                    parameters: params(&[("quiesce", "true")]),
                    ..group_snapshot_req("grp-param", &[&g3])
                }
            ),
        ),
        missing(
            "CreateVolumeGroupSnapshot",
            "name",
            rpc!(
                grp,
                create_volume_group_snapshot,
                group_snapshot_req("", &[&g3])
            ),
        ),
        case(
            "Error Scheme: CreateVolumeGroupSnapshot name with banned U+0000 → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                grp,
                create_volume_group_snapshot,
                group_snapshot_req("nul\u{0}", &[&g3])
            ),
        ),
        missing(
            "CreateVolumeGroupSnapshot",
            "source_volume_ids",
            rpc!(
                grp,
                create_volume_group_snapshot,
                group_snapshot_req("grp-none", &[])
            ),
        ),
        case(
            "CreateVolumeGroupSnapshot: a volume listed twice → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                grp,
                create_volume_group_snapshot,
                group_snapshot_req("grp-twice", &[&g3, &g3])
            ),
        ),
        case(
            "CreateVolumeGroupSnapshot: source volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(
                grp,
                create_volume_group_snapshot,
                group_snapshot_req("grp-novol", &[&g3, NO_VOL])
            ),
        ),
        case(
            "CreateVolumeGroupSnapshot: source volume id vol-../x → NOT_FOUND",
            Code::NotFound,
            rpc!(
                grp,
                create_volume_group_snapshot,
                group_snapshot_req("grp-evil", &["vol-../x"])
            ),
        ),
        case(
            "GetVolumeGroupSnapshot: success → OK",
            Code::Ok,
            rpc!(
                grp,
                get_volume_group_snapshot,
                get_group_snapshot_req(&gid, &members)
            ),
        ),
        case(
            "GetVolumeGroupSnapshot Errors: Snapshot list mismatch (a member missing) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                grp,
                get_volume_group_snapshot,
                get_group_snapshot_req(&gid, &one)
            ),
        ),
        case(
            "GetVolumeGroupSnapshot Errors: Snapshot list mismatch (a stranger) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                grp,
                get_volume_group_snapshot,
                get_group_snapshot_req(&gid, &wrong)
            ),
        ),
        // spec.md: "If SP does not need to rely on this field ... it SHOULD check this
        // field"; berth does not need it, and csi-sanity sends none. A list given is checked.
        case(
            "GetVolumeGroupSnapshot: no snapshot_ids (not needed, not checked) → OK",
            Code::Ok,
            rpc!(
                grp,
                get_volume_group_snapshot,
                get_group_snapshot_req(&gid, &[])
            ),
        ),
        missing(
            "GetVolumeGroupSnapshot",
            "group_snapshot_id",
            rpc!(
                grp,
                get_volume_group_snapshot,
                get_group_snapshot_req("", &members)
            ),
        ),
        case(
            "GetVolumeGroupSnapshot Errors: Volume group snapshot does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(
                grp,
                get_volume_group_snapshot,
                get_group_snapshot_req(NO_GROUP, &members)
            ),
        ),
        case(
            "GetVolumeGroupSnapshot Errors: does not exist (group-../x) → NOT_FOUND",
            Code::NotFound,
            rpc!(
                grp,
                get_volume_group_snapshot,
                get_group_snapshot_req("group-../x", &members)
            ),
        ),
        case(
            "DeleteSnapshot Errors: Snapshot is part of a group → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(ctl, delete_snapshot, delete_snapshot_req(&members[0])),
        ),
        case(
            "GetSnapshot of a group member → OK",
            Code::Ok,
            rpc!(ctl, get_snapshot, get_snap(&members[1])),
        ),
        case(
            "DeleteVolumeGroupSnapshot Errors: Snapshot list mismatch → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                grp,
                delete_volume_group_snapshot,
                delete_group_snapshot_req(&gid, &one)
            ),
        ),
        case(
            "DeleteVolumeGroupSnapshot Errors: Snapshot list mismatch (a stranger) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                grp,
                delete_volume_group_snapshot,
                delete_group_snapshot_req(&gid, &wrong)
            ),
        ),
        missing(
            "DeleteVolumeGroupSnapshot",
            "group_snapshot_id",
            rpc!(
                grp,
                delete_volume_group_snapshot,
                delete_group_snapshot_req("", &members)
            ),
        ),
        case(
            "GetVolumeGroupSnapshot: a refused delete deleted nothing → OK",
            Code::Ok,
            rpc!(
                grp,
                get_volume_group_snapshot,
                get_group_snapshot_req(&gid, &members)
            ),
        ),
        case(
            "DeleteVolumeGroupSnapshot: success, without snapshot_ids → OK",
            Code::Ok,
            rpc!(
                grp,
                delete_volume_group_snapshot,
                delete_group_snapshot_req(&gid, &[])
            ),
        ),
        case(
            "DeleteVolumeGroupSnapshot: repeated → OK",
            Code::Ok,
            rpc!(
                grp,
                delete_volume_group_snapshot,
                delete_group_snapshot_req(&gid, &members)
            ),
        ),
        case(
            "DeleteVolumeGroupSnapshot: unknown id → OK",
            Code::Ok,
            rpc!(
                grp,
                delete_volume_group_snapshot,
                delete_group_snapshot_req(NO_GROUP, &members)
            ),
        ),
        case(
            "DeleteVolumeGroupSnapshot: id group-../x → OK",
            Code::Ok,
            rpc!(
                grp,
                delete_volume_group_snapshot,
                delete_group_snapshot_req("group-../x", &members)
            ),
        ),
        case(
            "GetVolumeGroupSnapshot Errors: deleted group → NOT_FOUND",
            Code::NotFound,
            rpc!(
                grp,
                get_volume_group_snapshot,
                get_group_snapshot_req(&gid, &members)
            ),
        ),
        case(
            "GetSnapshot Errors: member of a deleted group → NOT_FOUND",
            Code::NotFound,
            rpc!(ctl, get_snapshot, get_snap(&members[0])),
        ),
    ];
    run("group snapshots", cases).await;
    assert_eq!(
        list_snapshot_ids(&ctl).await,
        Vec::<String>::new(),
        "nothing leaked by the refused creates"
    );
    // A snapshot the CO made on its own, with the name a member of group "grp2" would have
    // if members were named "<group>/<volume>": berth names members with a separator the
    // spec bans in names, so the group neither adopts nor touches the CO's snapshot.
    let user = create_snapshot(&ctl, &format!("grp2/{g2}"), &g1).await;
    let made = grp
        .clone()
        .create_volume_group_snapshot(group_snapshot_req("grp2", &[&g3, &g2]))
        .await
        .expect("CreateVolumeGroupSnapshot: no collision with a CO snapshot's name")
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(
        made.snapshots
            .iter()
            .all(|m| m.snapshot_id != user.snapshot_id),
        "the CO's snapshot is not a member"
    );
    let cases = vec![case(
        "GetSnapshot: the CO's own snapshot is untouched by a group with a look-alike name → OK",
        Code::Ok,
        rpc!(ctl, get_snapshot, get_snap(&user.snapshot_id)),
    )];
    run("group snapshot name collision", cases).await;
    let member_ids: Vec<String> = made
        .snapshots
        .iter()
        .map(|m| m.snapshot_id.clone())
        .collect();
    grp.clone()
        .delete_volume_group_snapshot(delete_group_snapshot_req(
            &made.group_snapshot_id,
            &member_ids,
        ))
        .await
        .expect("delete grp2");
    assert_eq!(
        list_snapshot_ids(&ctl).await,
        vec![user.snapshot_id.clone()],
        "deleting the group removed its members and nothing else"
    );
    unpublish_and_unstage(&d, &g1, "grp-data").await;
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- ControllerExpandVolume / NodeExpandVolume --------------------------------------------

/// spec.md "ControllerExpandVolume" (idempotent: a volume already that large → OK at its
/// size; node_expansion_required for filesystems only), "ControllerExpandVolume Errors" (every
/// row but "Volume in use", which an ONLINE plugin never answers), "NodeExpandVolume" and
/// "NodeExpandVolume Errors": the mounted filesystem grows online.
#[tokio::test(flavor = "multi_thread")]
async fn expand_volume() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let node = d.node().await;
    let e = create_volume(&ctl, vol("exp-xfs", 300 * MIB, xfs()))
        .await
        .volume_id;
    let b = create_volume(&ctl, vol("exp-block", 16 * MIB, block()))
        .await
        .volume_id;
    let target = stage_and_publish(&d, &e, &xfs(), "exp").await;
    let staging = d.path("exp/staging");
    let before = fs_total_bytes(&target);

    let r = ctl
        .clone()
        .controller_expand_volume(expand_req(&e, 400 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.capacity_bytes, r.node_expansion_required),
        (400 * MIB, true)
    );
    let r = ctl
        .clone()
        .controller_expand_volume(expand_req(&e, 400 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.capacity_bytes,
        400 * MIB,
        "repeated ControllerExpandVolume"
    );
    let r = ctl
        .clone()
        .controller_expand_volume(expand_req(&e, 350 * MIB, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.capacity_bytes,
        400 * MIB,
        "a volume already larger answers its size"
    );
    let r = ctl
        .clone()
        .controller_expand_volume(expand_req(&b, 32 * MIB, 64 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.capacity_bytes, r.node_expansion_required),
        (32 * MIB, false),
        "block volumes need no node step"
    );
    assert_eq!(
        get_volume(&ctl, &e).await.volume.unwrap().capacity_bytes,
        400 * MIB
    );

    let r = node
        .clone()
        .node_expand_volume(node_expand(&e, &target, range(400 * MIB, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 400 * MIB);
    let after = fs_total_bytes(&target);
    assert!(
        after > before + 80 * MIB as u64,
        "the filesystem grew online: {before} → {after}"
    );
    let r = node
        .clone()
        .node_expand_volume(node_expand(&e, &staging, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.capacity_bytes,
        400 * MIB,
        "repeated NodeExpandVolume (staging path)"
    );
    assert_eq!(fs_total_bytes(&target), after);

    let with_cap = |cap: csi::VolumeCapability| csi::ControllerExpandVolumeRequest {
        volume_capability: Some(cap),
        ..expand_req(&e, 400 * MIB, 0)
    };
    let node_cap = |cap: csi::VolumeCapability| csi::NodeExpandVolumeRequest {
        volume_capability: Some(cap),
        ..node_expand(&e, &target, None)
    };
    let cases = vec![
        case(
            "ControllerExpandVolume: no required_bytes (0 = unspecified) grows nothing → OK",
            Code::Ok,
            check("grew", {
                let mut c = ctl.clone();
                let b = b.clone();
                async move {
                    let a = c.controller_expand_volume(expand_req(&b, 0, 0)).await;
                    let z = c.controller_expand_volume(expand_req(&b, 0, 2 * GIB)).await;
                    [a, z]
                        .into_iter()
                        .all(|r| r.is_ok_and(|r| r.into_inner().capacity_bytes == 32 * MIB))
                }
            }),
        ),
        case(
            "ControllerExpandVolume: with a matching volume_capability → OK",
            Code::Ok,
            rpc!(ctl, controller_expand_volume, with_cap(xfs())),
        ),
        case(
            "ControllerExpandVolume Errors: Exceeds capabilities (block on xfs) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(ctl, controller_expand_volume, with_cap(block())),
        ),
        case(
            "ControllerExpandVolume Errors: Exceeds capabilities (MULTI_NODE) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                ctl,
                controller_expand_volume,
                with_cap(moded(xfs(), Mode::MultiNodeMultiWriter))
            ),
        ),
        case(
            "ControllerExpandVolume: capability without access_mode → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(ctl, controller_expand_volume, with_cap(no_access_mode())),
        ),
        case(
            "ControllerExpandVolume Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(ctl, controller_expand_volume, expand_req(NO_VOL, GIB, 0)),
        ),
        case(
            "ControllerExpandVolume Errors: Volume does not exist (vol-../x) → NOT_FOUND",
            Code::NotFound,
            rpc!(
                ctl,
                controller_expand_volume,
                expand_req("vol-../x", GIB, 0)
            ),
        ),
        case(
            "ControllerExpandVolume Errors: Unsupported capacity_range (limit below current size) → OUT_OF_RANGE",
            Code::OutOfRange,
            rpc!(ctl, controller_expand_volume, expand_req(&e, 0, 300 * MIB)),
        ),
        case(
            "ControllerExpandVolume Errors: Unsupported capacity_range (required > limit) → OUT_OF_RANGE",
            Code::OutOfRange,
            rpc!(
                ctl,
                controller_expand_volume,
                expand_req(&e, 600 * MIB, 500 * MIB)
            ),
        ),
        case(
            "ControllerExpandVolume: negative required_bytes → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(ctl, controller_expand_volume, expand_req(&e, -5, 0)),
        ),
        missing(
            "ControllerExpandVolume",
            "capacity_range",
            rpc!(
                ctl,
                controller_expand_volume,
                csi::ControllerExpandVolumeRequest {
                    capacity_range: None,
                    ..expand_req(&e, GIB, 0)
                }
            ),
        ),
        missing(
            "ControllerExpandVolume",
            "volume_id",
            rpc!(ctl, controller_expand_volume, expand_req("", GIB, 0)),
        ),
        case(
            "NodeExpandVolume: matching volume_capability → OK",
            Code::Ok,
            rpc!(node, node_expand_volume, node_cap(xfs())),
        ),
        case(
            "NodeExpandVolume Errors: Exceeds capabilities (block on xfs) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(node, node_expand_volume, node_cap(block())),
        ),
        case(
            "NodeExpandVolume Errors: Exceeds capabilities (ext4 on xfs) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(node, node_expand_volume, node_cap(ext4())),
        ),
        case(
            "NodeExpandVolume: capability without access_type → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(node, node_expand_volume, node_cap(no_access_type())),
        ),
        case(
            "NodeExpandVolume Errors: Unsupported capacity_range (required above the volume) → OUT_OF_RANGE",
            Code::OutOfRange,
            rpc!(
                node,
                node_expand_volume,
                node_expand(&e, &target, range(GIB, 0))
            ),
        ),
        case(
            "NodeExpandVolume Errors: Unsupported capacity_range (limit below the volume) → OUT_OF_RANGE",
            Code::OutOfRange,
            rpc!(
                node,
                node_expand_volume,
                node_expand(&e, &target, range(0, 300 * MIB))
            ),
        ),
        case(
            "NodeExpandVolume: negative limit_bytes → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                node,
                node_expand_volume,
                node_expand(&e, &target, range(0, -1))
            ),
        ),
        case(
            "NodeExpandVolume Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_expand_volume, node_expand(NO_VOL, &target, None)),
        ),
        case(
            "NodeExpandVolume Errors: Volume does not exist (../../etc) → NOT_FOUND",
            Code::NotFound,
            rpc!(
                node,
                node_expand_volume,
                node_expand("../../etc", &target, None)
            ),
        ),
        case(
            "NodeExpandVolume Errors: Volume does not exist at volume_path → NOT_FOUND",
            Code::NotFound,
            rpc!(
                node,
                node_expand_volume,
                node_expand(&e, &d.path("elsewhere"), None)
            ),
        ),
        case(
            "NodeExpandVolume: volume not staged on this node → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(node, node_expand_volume, node_expand(&b, &target, None)),
        ),
        missing(
            "NodeExpandVolume",
            "volume_id",
            rpc!(node, node_expand_volume, node_expand("", &target, None)),
        ),
        missing(
            "NodeExpandVolume",
            "volume_path",
            rpc!(
                node,
                node_expand_volume,
                csi::NodeExpandVolumeRequest {
                    volume_path: String::new(),
                    ..node_expand(&e, &target, None)
                }
            ),
        ),
        relative(
            "NodeExpandVolume",
            "volume_path",
            rpc!(
                node,
                node_expand_volume,
                node_expand(&e, Path::new("relative/path"), None)
            ),
        ),
        case(
            "NodeExpandVolume: volume_path with .. → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                node,
                node_expand_volume,
                node_expand(&e, &target.join("../target"), None)
            ),
        ),
    ];
    run("ControllerExpandVolume/NodeExpandVolume", cases).await;
    assert_eq!(
        get_volume(&ctl, &e).await.volume.unwrap().capacity_bytes,
        400 * MIB,
        "refused expansions changed nothing"
    );
    unpublish_and_unstage(&d, &e, "exp").await;
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- ControllerModifyVolume --------------------------------------------------------------

/// spec.md "ControllerModifyVolume" and its "Errors": Parameters not supported →
/// INVALID_ARGUMENT with "The SP MUST NOT have applied any modification"; Volume does not
/// exist → NOT_FOUND. `preallocate: "true"` really allocates every block of the image.
#[tokio::test(flavor = "multi_thread")]
async fn modify_volume() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let m = create_volume(&ctl, vol("mod", 64 * MIB, block()))
        .await
        .volume_id;
    let img = d.volume_image(&m);
    assert!(allocated(&img) < MIB as u64, "a new volume is thin");

    let cases = vec![
        case(
            "ControllerModifyVolume Errors: Parameters not supported (unknown key) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                ctl,
                controller_modify_volume,
                modify(&m, &[("iops", "3000")])
            ),
        ),
        case(
            "ControllerModifyVolume Errors: Parameters not supported (one known, one unknown key) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                ctl,
                controller_modify_volume,
                modify(&m, &[("preallocate", "true"), ("iops", "3000")])
            ),
        ),
        case(
            "ControllerModifyVolume Errors: Parameters not supported (bad value) → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                ctl,
                controller_modify_volume,
                modify(&m, &[("preallocate", "yes")])
            ),
        ),
        case(
            "ControllerModifyVolume Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(
                ctl,
                controller_modify_volume,
                modify(NO_VOL, &[("preallocate", "true")])
            ),
        ),
        case(
            "ControllerModifyVolume Errors: Volume does not exist (vol-../x) → NOT_FOUND",
            Code::NotFound,
            rpc!(
                ctl,
                controller_modify_volume,
                modify("vol-../x", &[("preallocate", "true")])
            ),
        ),
        missing(
            "ControllerModifyVolume",
            "volume_id",
            rpc!(
                ctl,
                controller_modify_volume,
                modify("", &[("preallocate", "true")])
            ),
        ),
        missing(
            "ControllerModifyVolume",
            "mutable_parameters",
            rpc!(ctl, controller_modify_volume, modify(&m, &[])),
        ),
    ];
    run("ControllerModifyVolume: refused", cases).await;
    assert!(
        allocated(&img) < MIB as u64,
        "a refused modification applied nothing"
    );

    let cases = vec![
        case(
            "ControllerModifyVolume: preallocate=true → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_modify_volume,
                modify(&m, &[("preallocate", "true")])
            ),
        ),
        case(
            "ControllerModifyVolume: repeated → OK",
            Code::Ok,
            rpc!(
                ctl,
                controller_modify_volume,
                modify(&m, &[("preallocate", "true")])
            ),
        ),
    ];
    run("ControllerModifyVolume", cases).await;
    assert!(
        allocated(&img) >= 64 * MIB as u64,
        "preallocate=true allocated the image: {}",
        allocated(&img)
    );
    // Volume creation with the same mutable parameter allocates up front.
    let mut thick = vol("mod-thick", 32 * MIB, block());
    thick.mutable_parameters = params(&[("preallocate", "true")]);
    let t = create_volume(&ctl, thick.clone()).await;
    assert!(
        allocated(&d.volume_image(&t.volume_id)) >= 32 * MIB as u64,
        "CreateVolume with preallocate=true"
    );
    assert_eq!(
        create_volume(&ctl, thick).await,
        t,
        "repeated CreateVolume with mutable_parameters"
    );
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- Node: stage, publish, stats, unpublish, unstage (filesystem) --------------------------

/// spec.md "NodeStageVolume" + "NodeStageVolume Errors" (every row), "NodePublishVolume" +
/// "NodePublishVolume Errors" (every row) and its second-publish table for
/// SINGLE_NODE_SINGLE_WRITER / SINGLE_NODE_MULTI_WRITER, "NodeGetVolumeStats" + "Errors",
/// "NodeUnpublishVolume" + "Errors", "NodeUnstageVolume" + "Errors" ("not staged to the
/// staging_target_path → 0 OK"), "DeleteVolume Errors": Volume in use (staged) →
/// FAILED_PRECONDITION; a read-only publish is really read-only.
/// spec.md "Error Scheme": a request without a REQUIRED field is INVALID_ARGUMENT, whatever
/// its volume id names: an existing volume, none, or nothing that parses. A CO that omits a
/// field must learn that, not that the volume is missing.
#[tokio::test(flavor = "multi_thread")]
async fn node_rpcs_check_their_fields_before_the_volume_id() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let node = d.node().await;
    let n = create_volume(&ctl, vol("node-fields", 64 * MIB, ext4()))
        .await
        .volume_id;
    let (stg, tgt, none) = (d.path("f/staging"), d.path("f/target"), Path::new(""));
    let mut cases = Vec::new();
    for id in [NO_VOL, "vol-../x", n.as_str()] {
        let no_cap = |mut r: csi::NodeStageVolumeRequest| {
            r.volume_capability = None;
            r
        };
        let pub_no_cap = |mut r: csi::NodePublishVolumeRequest| {
            r.volume_capability = None;
            r
        };
        cases.extend([
            missing(
                &format!("NodeStageVolume({id})"),
                "staging_target_path",
                rpc!(node, node_stage_volume, stage_req(id, none, ext4())),
            ),
            missing(
                &format!("NodeStageVolume({id})"),
                "volume_capability",
                rpc!(node, node_stage_volume, no_cap(stage_req(id, &stg, ext4()))),
            ),
            missing(
                &format!("NodeStageVolume({id}) capability"),
                "access_mode",
                rpc!(
                    node,
                    node_stage_volume,
                    stage_req(id, &stg, no_access_mode())
                ),
            ),
            missing(
                &format!("NodeUnstageVolume({id})"),
                "staging_target_path",
                rpc!(node, node_unstage_volume, unstage_req(id, none)),
            ),
            missing(
                &format!("NodePublishVolume({id})"),
                "target_path",
                rpc!(
                    node,
                    node_publish_volume,
                    publish_req(id, &stg, none, ext4(), false)
                ),
            ),
            missing(
                &format!("NodePublishVolume({id})"),
                "volume_capability",
                rpc!(
                    node,
                    node_publish_volume,
                    pub_no_cap(publish_req(id, &stg, &tgt, ext4(), false))
                ),
            ),
            missing(
                &format!("NodeUnpublishVolume({id})"),
                "target_path",
                rpc!(node, node_unpublish_volume, unpublish_req(id, none)),
            ),
            missing(
                &format!("NodeGetVolumeStats({id})"),
                "volume_path",
                rpc!(node, node_get_volume_stats, stats(id, none)),
            ),
            missing(
                &format!("NodeExpandVolume({id})"),
                "volume_path",
                rpc!(node, node_expand_volume, node_expand(id, none, None)),
            ),
        ]);
    }
    run("node fields before the volume id", cases).await;
    delete_volume(&ctl, &n).await;
    d.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn node_filesystem_lifecycle() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let node = d.node().await;
    let n = create_volume(&ctl, vol("node-fs", 64 * MIB, ext4()))
        .await
        .volume_id;
    let other = create_volume(&ctl, vol("node-other", 64 * MIB, ext4()))
        .await
        .volume_id;
    let stg = d.path("n/staging");
    let stg2 = d.path("n/staging2");
    let t = |i: u32| d.path(&format!("n/target{i}"));

    let cases = vec![
        case(
            "NodeStageVolume Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_stage_volume, stage_req(NO_VOL, &stg, ext4())),
        ),
        case(
            "NodeStageVolume Errors: Volume does not exist (vol-../x) → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_stage_volume, stage_req("vol-../x", &stg, ext4())),
        ),
        missing(
            "NodeStageVolume",
            "volume_id",
            rpc!(node, node_stage_volume, stage_req("", &stg, ext4())),
        ),
        missing(
            "NodeStageVolume",
            "staging_target_path",
            rpc!(
                node,
                node_stage_volume,
                stage_req(&n, Path::new(""), ext4())
            ),
        ),
        missing(
            "NodeStageVolume",
            "volume_capability",
            rpc!(
                node,
                node_stage_volume,
                csi::NodeStageVolumeRequest {
                    volume_capability: None,
                    ..stage_req(&n, &stg, ext4())
                }
            ),
        ),
        missing(
            "NodeStageVolume capability",
            "access_mode",
            rpc!(
                node,
                node_stage_volume,
                stage_req(&n, &stg, no_access_mode())
            ),
        ),
        missing(
            "NodeStageVolume capability",
            "access_type",
            rpc!(
                node,
                node_stage_volume,
                stage_req(&n, &stg, no_access_type())
            ),
        ),
        relative(
            "NodeStageVolume",
            "staging_target_path",
            rpc!(
                node,
                node_stage_volume,
                stage_req(&n, Path::new("k8s/staging"), ext4())
            ),
        ),
        case(
            "NodeStageVolume: staging_target_path with .. → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                node,
                node_stage_volume,
                stage_req(&n, &stg.join("../x"), ext4())
            ),
        ),
        case(
            "NodeStageVolume Errors: Exceeds capabilities (block on ext4) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(node, node_stage_volume, stage_req(&n, &stg, block())),
        ),
        case(
            "NodeStageVolume Errors: Exceeds capabilities (xfs on ext4) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(node, node_stage_volume, stage_req(&n, &stg, xfs())),
        ),
        case(
            "NodeStageVolume Errors: Exceeds capabilities (MULTI_NODE_SINGLE_WRITER) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(
                node,
                node_stage_volume,
                stage_req(&n, &stg, moded(ext4(), Mode::MultiNodeSingleWriter))
            ),
        ),
        case(
            "NodeStageVolume Errors: Exceeds capabilities (btrfs) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(
                node,
                node_stage_volume,
                stage_req(&n, &stg, mount_cap("btrfs"))
            ),
        ),
        case(
            "NodeStageVolume: success → OK",
            Code::Ok,
            rpc!(node, node_stage_volume, stage_req(&n, &stg, ext4())),
        ),
        case(
            "NodeStageVolume: repeated → OK",
            Code::Ok,
            rpc!(node, node_stage_volume, stage_req(&n, &stg, ext4())),
        ),
        case(
            "NodeStageVolume Errors: Volume published but is incompatible (other mount flags at the same path) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                node,
                node_stage_volume,
                stage_req(&n, &stg, mount_with("ext4", &["noatime"], ""))
            ),
        ),
        case(
            "NodeStageVolume Errors: Volume published but is incompatible (other access mode at the same path) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                node,
                node_stage_volume,
                stage_req(&n, &stg, moded(ext4(), Mode::SingleNodeMultiWriter))
            ),
        ),
        case(
            "NodeStageVolume: already staged at another staging_target_path → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(node, node_stage_volume, stage_req(&n, &stg2, ext4())),
        ),
        case(
            "DeleteVolume Errors: Volume in use (staged on the node) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(ctl, delete_volume, delete_volume_req(&n)),
        ),
    ];
    run("NodeStageVolume", cases).await;
    assert_eq!(
        mount_count(&stg),
        1,
        "one mount at the staging path after a repeated stage"
    );
    assert_eq!(
        d.volume_loop_devices().len(),
        1,
        "one loop device after a repeated stage"
    );
    assert!(!stg2.exists(), "the refused stage touched nothing");

    let cases = vec![
        case(
            "NodePublishVolume: success → OK",
            Code::Ok,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, &t(1), ext4(), false)
            ),
        ),
        case(
            "NodePublishVolume: repeated → OK",
            Code::Ok,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, &t(1), ext4(), false)
            ),
        ),
        case(
            "NodePublishVolume Errors: Volume published but is incompatible (readonly) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, &t(1), ext4(), true)
            ),
        ),
        case(
            "NodePublishVolume Errors: Volume published but is incompatible (SINGLE_NODE_READER_ONLY) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                node,
                node_publish_volume,
                publish_req(
                    &n,
                    &stg,
                    &t(1),
                    moded(ext4(), Mode::SingleNodeReaderOnly),
                    false
                )
            ),
        ),
        case(
            "NodePublishVolume Errors: Volume published but is incompatible (other access mode, same readonly) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                node,
                node_publish_volume,
                publish_req(
                    &n,
                    &stg,
                    &t(1),
                    moded(ext4(), Mode::SingleNodeMultiWriter),
                    false
                )
            ),
        ),
        case(
            "NodePublishVolume Errors: Volume published but is incompatible (other mount flags) → ALREADY_EXISTS",
            Code::AlreadyExists,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, &t(1), mount_with("ext4", &["noatime"], ""), false)
            ),
        ),
        case(
            "NodePublishVolume Errors: Exceeds capabilities (block on a filesystem stage) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, &t(9), block(), false)
            ),
        ),
        case(
            "NodePublishVolume Errors: Exceeds capabilities (MULTI_NODE_MULTI_WRITER) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(
                node,
                node_publish_volume,
                publish_req(
                    &n,
                    &stg,
                    &t(9),
                    moded(ext4(), Mode::MultiNodeMultiWriter),
                    false
                )
            ),
        ),
        case(
            "NodePublishVolume Errors: Staging target path not set → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, Path::new(""), &t(9), ext4(), false)
            ),
        ),
        case(
            "NodePublishVolume: staging_target_path is not where it is staged → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg2, &t(9), ext4(), false)
            ),
        ),
        case(
            "NodePublishVolume: volume not staged (NodeStageVolume must succeed first) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&other, &stg2, &t(9), ext4(), false)
            ),
        ),
        case(
            "NodePublishVolume Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(
                node,
                node_publish_volume,
                publish_req(NO_VOL, &stg, &t(9), ext4(), false)
            ),
        ),
        case(
            "NodePublishVolume Errors: Volume does not exist (../../etc) → NOT_FOUND",
            Code::NotFound,
            rpc!(
                node,
                node_publish_volume,
                publish_req("../../etc", &stg, &t(9), ext4(), false)
            ),
        ),
        missing(
            "NodePublishVolume",
            "volume_id",
            rpc!(
                node,
                node_publish_volume,
                publish_req("", &stg, &t(9), ext4(), false)
            ),
        ),
        missing(
            "NodePublishVolume",
            "target_path",
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, Path::new(""), ext4(), false)
            ),
        ),
        missing(
            "NodePublishVolume",
            "volume_capability",
            rpc!(
                node,
                node_publish_volume,
                csi::NodePublishVolumeRequest {
                    volume_capability: None,
                    ..publish_req(&n, &stg, &t(9), ext4(), false)
                }
            ),
        ),
        missing(
            "NodePublishVolume capability",
            "access_mode",
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, &t(9), no_access_mode(), false)
            ),
        ),
        relative(
            "NodePublishVolume",
            "target_path",
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, Path::new("target"), ext4(), false)
            ),
        ),
        case(
            "NodePublishVolume: target_path with // → INVALID_ARGUMENT",
            Code::InvalidArgument,
            rpc!(
                node,
                node_publish_volume,
                publish_req(
                    &n,
                    &stg,
                    Path::new(&format!("{}//x", path_str(&t(9)))),
                    ext4(),
                    false
                )
            ),
        ),
        // The second-publish table (the plugin has SINGLE_NODE_MULTI_WRITER).
        case(
            "NodePublishVolume second table: SINGLE_NODE_MULTI_WRITER, T1!=T2 → OK",
            Code::Ok,
            rpc!(
                node,
                node_publish_volume,
                publish_req(
                    &n,
                    &stg,
                    &t(2),
                    moded(ext4(), Mode::SingleNodeMultiWriter),
                    false
                )
            ),
        ),
        case(
            "NodePublishVolume second table: SINGLE_NODE_SINGLE_WRITER, T1!=T2 → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(
                node,
                node_publish_volume,
                publish_req(
                    &n,
                    &stg,
                    &t(3),
                    moded(ext4(), Mode::SingleNodeSingleWriter),
                    false
                )
            ),
        ),
        case(
            "NodePublishVolume: SINGLE_NODE_WRITER at another target (pods sharing a RWO volume on one node) → OK",
            Code::Ok,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, &t(4), ext4(), false)
            ),
        ),
        case(
            "NodePublishVolume: readonly=true → OK",
            Code::Ok,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, &t(5), ext4(), true)
            ),
        ),
        case(
            "NodePublishVolume: SINGLE_NODE_READER_ONLY → OK",
            Code::Ok,
            rpc!(
                node,
                node_publish_volume,
                publish_req(
                    &n,
                    &stg,
                    &t(6),
                    moded(ext4(), Mode::SingleNodeReaderOnly),
                    false
                )
            ),
        ),
        case(
            "NodePublishVolume: readonly repeated → OK",
            Code::Ok,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&n, &stg, &t(5), ext4(), true)
            ),
        ),
    ];
    run("NodePublishVolume", cases).await;
    for i in [1, 2, 4, 5, 6] {
        assert_eq!(
            mount_count(&t(i)),
            1,
            "target{i} is mounted once, repeats included"
        );
    }
    assert_eq!(mount_count(&stg), 1);
    assert_eq!(d.volume_loop_devices().len(), 1);
    for i in [3, 9] {
        assert!(!t(i).exists(), "a refused publish left target{i} behind");
    }
    // Read-only really is read-only; the read-write targets share one filesystem.
    write_pattern(&t(1).join("data"), 3, 4 * MIB as usize);
    assert_eq!(
        std::fs::read(t(5).join("data")).unwrap(),
        pattern(3, 4 * MIB as usize)
    );
    for i in [5, 6] {
        assert_eq!(
            errno_of_write(&t(i).join("w")),
            Some(libc::EROFS),
            "a write to read-only target{i}"
        );
    }
    assert_eq!(
        errno_of_write(&t(2).join("w")),
        None,
        "a write to read-write target2"
    );

    // Stats: bytes and inodes, at a target and at the staging path.
    let st = node
        .clone()
        .node_get_volume_stats(stats(&n, &t(1)))
        .await
        .unwrap()
        .into_inner();
    let unit = |u: csi::volume_usage::Unit| {
        st.usage
            .iter()
            .find(|x| x.unit == u as i32)
            .cloned()
            .unwrap_or_else(|| panic!("no {u:?} usage in {:?}", st.usage))
    };
    let bytes = unit(csi::volume_usage::Unit::Bytes);
    let inodes = unit(csi::volume_usage::Unit::Inodes);
    assert!(
        bytes.total > 48 * MIB && bytes.total <= 64 * MIB,
        "total bytes {bytes:?}"
    );
    assert!(
        bytes.used >= 4 * MIB && bytes.available > 0 && bytes.used + bytes.available <= bytes.total,
        "{bytes:?}"
    );
    assert!(
        inodes.total > 0
            && inodes.used > 0
            && inodes.available > 0
            && inodes.used + inodes.available <= inodes.total,
        "{inodes:?}"
    );
    assert_eq!(
        st.volume_condition.as_ref().map(|c| c.abnormal),
        Some(false),
        "{:?}",
        st.volume_condition
    );
    for i in 0..10 {
        std::fs::write(t(1).join(format!("small{i}")), b"x").unwrap();
    }
    let st2 = node
        .clone()
        .node_get_volume_stats(stats(&n, &stg))
        .await
        .unwrap()
        .into_inner();
    let inodes2 = st2
        .usage
        .iter()
        .find(|x| x.unit == csi::volume_usage::Unit::Inodes as i32)
        .unwrap();
    assert!(
        inodes2.used >= inodes.used + 10,
        "ten files use ten inodes: {inodes:?} → {inodes2:?}"
    );

    let cases = vec![
        case(
            "NodeGetVolumeStats Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_get_volume_stats, stats(NO_VOL, &t(1))),
        ),
        case(
            "NodeGetVolumeStats Errors: Volume does not exist (vol-../x) → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_get_volume_stats, stats("vol-../x", &t(1))),
        ),
        case(
            "NodeGetVolumeStats Errors: Volume does not exist on specified volume_path → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_get_volume_stats, stats(&n, &d.path("n/nowhere"))),
        ),
        case(
            "NodeGetVolumeStats Errors: volume exists but is not on this node → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_get_volume_stats, stats(&other, &t(1))),
        ),
        missing(
            "NodeGetVolumeStats",
            "volume_id",
            rpc!(node, node_get_volume_stats, stats("", &t(1))),
        ),
        missing(
            "NodeGetVolumeStats",
            "volume_path",
            rpc!(node, node_get_volume_stats, stats(&n, Path::new(""))),
        ),
        // Not INVALID_ARGUMENT: the table's "does not exist on the specified volume_path".
        case(
            "NodeGetVolumeStats Errors: relative volume_path of a staged volume → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_get_volume_stats, stats(&n, Path::new("a/b"))),
        ),
        case(
            "NodeUnstageVolume: still published (CO must unpublish first) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(node, node_unstage_volume, unstage_req(&n, &stg)),
        ),
        case(
            "NodeUnstageVolume: not staged to this staging_target_path → OK",
            Code::Ok,
            rpc!(node, node_unstage_volume, unstage_req(&n, &stg2)),
        ),
        case(
            "NodeGetVolumeStats: the stage elsewhere was left alone → OK",
            Code::Ok,
            rpc!(node, node_get_volume_stats, stats(&n, &stg)),
        ),
    ];
    run("NodeGetVolumeStats", cases).await;
    assert!(
        is_mounted(&stg),
        "NodeUnstageVolume at another path left the stage alone"
    );

    let mut cases = Vec::new();
    for i in [1, 2, 4, 5, 6] {
        cases.push(case(
            format!("NodeUnpublishVolume target{i}: success → OK"),
            Code::Ok,
            rpc!(node, node_unpublish_volume, unpublish_req(&n, &t(i))),
        ));
    }
    cases.extend([
        case(
            "NodeUnpublishVolume: repeated (known volume, nothing there) → OK",
            Code::Ok,
            rpc!(node, node_unpublish_volume, unpublish_req(&n, &t(1))),
        ),
        case(
            "NodeUnpublishVolume: a target never published (known volume) → OK",
            Code::Ok,
            rpc!(node, node_unpublish_volume, unpublish_req(&n, &t(7))),
        ),
        case(
            "NodeUnpublishVolume: known volume not on this node → OK",
            Code::Ok,
            rpc!(node, node_unpublish_volume, unpublish_req(&other, &t(1))),
        ),
        case(
            "NodeUnpublishVolume Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_unpublish_volume, unpublish_req(NO_VOL, &t(1))),
        ),
        case(
            "NodeUnpublishVolume Errors: Volume does not exist (vol-../x) → NOT_FOUND",
            Code::NotFound,
            rpc!(
                node,
                node_unpublish_volume,
                unpublish_req("vol-../x", &t(1))
            ),
        ),
        missing(
            "NodeUnpublishVolume",
            "volume_id",
            rpc!(node, node_unpublish_volume, unpublish_req("", &t(1))),
        ),
        missing(
            "NodeUnpublishVolume",
            "target_path",
            rpc!(
                node,
                node_unpublish_volume,
                unpublish_req(&n, Path::new(""))
            ),
        ),
        relative(
            "NodeUnpublishVolume",
            "target_path",
            rpc!(
                node,
                node_unpublish_volume,
                unpublish_req(&n, Path::new("x"))
            ),
        ),
        case(
            "NodeUnstageVolume: success → OK",
            Code::Ok,
            rpc!(node, node_unstage_volume, unstage_req(&n, &stg)),
        ),
        case(
            "NodeUnstageVolume: repeated → OK",
            Code::Ok,
            rpc!(node, node_unstage_volume, unstage_req(&n, &stg)),
        ),
        case(
            "NodeUnstageVolume: known volume never staged → OK",
            Code::Ok,
            rpc!(node, node_unstage_volume, unstage_req(&other, &stg2)),
        ),
        case(
            "NodeUnstageVolume Errors: Volume does not exist → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_unstage_volume, unstage_req(NO_VOL, &stg)),
        ),
        case(
            "NodeUnstageVolume Errors: Volume does not exist (../../etc) → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_unstage_volume, unstage_req("../../etc", &stg)),
        ),
        missing(
            "NodeUnstageVolume",
            "volume_id",
            rpc!(node, node_unstage_volume, unstage_req("", &stg)),
        ),
        missing(
            "NodeUnstageVolume",
            "staging_target_path",
            rpc!(node, node_unstage_volume, unstage_req(&n, Path::new(""))),
        ),
        case(
            "NodeGetVolumeStats Errors: unstaged volume → NOT_FOUND",
            Code::NotFound,
            rpc!(node, node_get_volume_stats, stats(&n, &stg)),
        ),
        case(
            "DeleteVolume: no longer in use → OK",
            Code::Ok,
            rpc!(ctl, delete_volume, delete_volume_req(&n)),
        ),
    ]);
    run("NodeUnpublishVolume/NodeUnstageVolume", cases).await;

    // design.md "Error codes": an id that does not exist is NOT_FOUND even with something
    // mounted at the path, and that mount is left alone: berth unmounts only the staging
    // and target paths it recorded for a volume (issue 11, item 9). An earlier version
    // unmounted and removed whatever was there, which the spec's table does not ask for.
    let (stray_target, stray_staging) = (d.path("n/stray-target"), d.path("n/stray-staging"));
    for p in [&stray_target, &stray_staging] {
        std::fs::create_dir_all(p).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(p)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs at {}", p.display());
    }
    let cases = vec![
        case(
            "NodeUnpublishVolume Errors: unknown id, something mounted at target_path → NOT_FOUND (left alone)",
            Code::NotFound,
            rpc!(
                node,
                node_unpublish_volume,
                unpublish_req(NO_VOL, &stray_target)
            ),
        ),
        case(
            "NodeUnstageVolume Errors: unknown id, something mounted at staging_target_path → NOT_FOUND (left alone)",
            Code::NotFound,
            rpc!(
                node,
                node_unstage_volume,
                unstage_req(NO_VOL, &stray_staging)
            ),
        ),
        case(
            "NodeUnpublishVolume: known volume, someone else's mount at target_path → OK (left alone)",
            Code::Ok,
            rpc!(
                node,
                node_unpublish_volume,
                unpublish_req(&other, &stray_target)
            ),
        ),
        case(
            "NodeUnstageVolume: known volume, someone else's mount at staging_target_path → OK (left alone)",
            Code::Ok,
            rpc!(
                node,
                node_unstage_volume,
                unstage_req(&other, &stray_staging)
            ),
        ),
    ];
    run("stray mounts", cases).await;
    for p in [&stray_target, &stray_staging] {
        assert!(
            is_mounted(p),
            "{} is not berth's: left mounted",
            p.display()
        );
        nix::mount::umount2(p.as_path(), nix::mount::MntFlags::empty()).unwrap();
        std::fs::remove_dir(p).unwrap();
    }
    for i in 1..=9 {
        // "The SP MUST delete the file or directory it created at this path."
        assert!(!t(i).exists(), "target{i} removed by NodeUnpublishVolume");
    }
    assert!(!is_mounted(&stg));
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- Node: only what berth recorded is touched ----------------------------------------------

/// NodeUnpublishVolume and NodeUnstageVolume act only on the target and staging paths berth
/// recorded for the volume (issue 11, item 9). Any other path named with a volume id that
/// exists is answered OK (spec: not published / not staged there is success) and left as it
/// is: a file, a directory with content, someone else's mount, a symlink to the volume's own
/// mounted target. A path inside berth's pool or state directory, or one resolving there
/// through a symlink, is INVALID_ARGUMENT, and nothing there is removed.
#[tokio::test(flavor = "multi_thread")]
async fn node_touches_only_the_paths_it_recorded() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let node = d.node().await;
    let v = create_volume(&ctl, vol("own", 64 * MIB, ext4()))
        .await
        .volume_id;
    let w = create_volume(&ctl, vol("own-unstaged", 16 * MIB, block()))
        .await
        .volume_id;
    let target = stage_and_publish(&d, &v, &ext4(), "own").await;
    write_pattern(&target.join("data"), 1, 4096);

    let file = d.path("else/file");
    let dir = d.path("else/dir");
    let mnt = d.path("else/mnt");
    let link = d.path("else/link-to-target");
    let link_stg = d.path("else/link-to-staging");
    let into_pool = d.path("else/link-into-pool");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(&file, b"not berth's").unwrap();
    std::fs::write(dir.join("sub/keep"), b"not berth's").unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs at {}", mnt.display());
    std::fs::write(mnt.join("keep"), b"not berth's").unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    std::os::unix::fs::symlink(d.staging_path("own"), &link_stg).unwrap();
    let image = d.volume_image(&w);
    std::os::unix::fs::symlink(&image, &into_pool).unwrap();
    let pool_dir = d.pool_root().join("berth/volumes");

    let mut cases = Vec::new();
    for p in [&file, &dir, &mnt, &link, &link_stg] {
        cases.push(case(
            format!(
                "NodeUnpublishVolume: {} was never published → OK, untouched",
                p.display()
            ),
            Code::Ok,
            rpc!(node, node_unpublish_volume, unpublish_req(&v, p)),
        ));
        cases.push(case(
            format!(
                "NodeUnstageVolume: {} was never staged → OK, untouched",
                p.display()
            ),
            Code::Ok,
            rpc!(node, node_unstage_volume, unstage_req(&w, p)),
        ));
    }
    for p in [
        &image,
        &pool_dir,
        &d.pool_root(),
        &d.state_dir(),
        &into_pool,
    ] {
        cases.push(case(
            format!(
                "NodeUnpublishVolume: {} is berth's storage → INVALID_ARGUMENT",
                p.display()
            ),
            Code::InvalidArgument,
            rpc!(node, node_unpublish_volume, unpublish_req(&v, p)),
        ));
        cases.push(case(
            format!(
                "NodeUnstageVolume: {} is berth's storage → INVALID_ARGUMENT",
                p.display()
            ),
            Code::InvalidArgument,
            rpc!(node, node_unstage_volume, unstage_req(&w, p)),
        ));
    }
    cases.push(case(
        "NodePublishVolume: a target inside the pool → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            node,
            node_publish_volume,
            publish_req(
                &v,
                &d.staging_path("own"),
                &pool_dir.join("t"),
                ext4(),
                false
            )
        ),
    ));
    cases.push(case(
        "NodeStageVolume: a staging path inside the state directory → INVALID_ARGUMENT",
        Code::InvalidArgument,
        rpc!(
            node,
            node_stage_volume,
            stage_req(&w, &d.state_dir().join("stg"), block())
        ),
    ));
    run("paths berth did not record", cases).await;

    assert_eq!(std::fs::read(&file).unwrap(), b"not berth's");
    assert_eq!(std::fs::read(dir.join("sub/keep")).unwrap(), b"not berth's");
    assert!(is_mounted(&mnt), "someone else's mount left mounted");
    assert_eq!(std::fs::read(mnt.join("keep")).unwrap(), b"not berth's");
    for l in [&link, &link_stg, &into_pool] {
        assert!(
            std::fs::symlink_metadata(l)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{} left in place",
            l.display()
        );
    }
    assert!(
        is_mounted(&target),
        "a symlink to the target was not followed"
    );
    assert!(
        is_mounted(&d.staging_path("own")),
        "nor one to the staging path"
    );
    assert_eq!(
        std::fs::read(target.join("data")).unwrap(),
        pattern(1, 4096)
    );
    assert!(
        image.exists(),
        "a volume image named as a target is never removed"
    );
    assert!(!d.pool_root().join("berth/volumes/t").exists());
    assert!(!d.state_dir().join("stg").exists());

    nix::mount::umount2(mnt.as_path(), nix::mount::MntFlags::empty()).unwrap();
    std::fs::remove_dir_all(d.path("else")).unwrap();
    unpublish_and_unstage(&d, &v, "own").await;
    assert!(!target.exists(), "the recorded target is removed");
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- Node: raw block ----------------------------------------------------------------------

/// spec.md "NodePublishVolume" for access type block ("the SP SHALL place the block device at
/// target_path"), read-only block publish, "NodeGetVolumeStats" of a block volume (bytes
/// only), "NodeStageVolume Errors": Exceeds capabilities (mount on block) →
/// FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread")]
async fn node_block_lifecycle() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let node = d.node().await;
    let b = create_volume(&ctl, vol("node-block", 16 * MIB, block()))
        .await
        .volume_id;
    let stg = d.path("b/staging");
    let (t1, t2) = (d.path("b/target1"), d.path("b/target2"));
    let cases = vec![
        case(
            "NodeStageVolume Errors: Exceeds capabilities (mount on block) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(node, node_stage_volume, stage_req(&b, &stg, ext4())),
        ),
        case(
            "NodeStageVolume block: success → OK",
            Code::Ok,
            rpc!(node, node_stage_volume, stage_req(&b, &stg, block())),
        ),
        case(
            "NodeStageVolume block: repeated → OK",
            Code::Ok,
            rpc!(node, node_stage_volume, stage_req(&b, &stg, block())),
        ),
        case(
            "NodePublishVolume block: success → OK",
            Code::Ok,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&b, &stg, &t1, block(), false)
            ),
        ),
        case(
            "NodePublishVolume block: repeated → OK",
            Code::Ok,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&b, &stg, &t1, block(), false)
            ),
        ),
        case(
            "NodePublishVolume Errors: Exceeds capabilities (mount on a block stage) → FAILED_PRECONDITION",
            Code::FailedPrecondition,
            rpc!(
                node,
                node_publish_volume,
                publish_req(&b, &stg, &d.path("b/target3"), ext4(), false)
            ),
        ),
    ];
    run("block stage/publish", cases).await;
    assert_eq!(
        mount_count(&t1),
        1,
        "one mount after a repeated block publish"
    );
    assert_eq!(
        d.volume_loop_devices().len(),
        1,
        "one loop device after a repeated block stage"
    );
    for label in [
        "NodePublishVolume block: readonly → OK",
        "NodePublishVolume block: readonly repeated → OK",
    ] {
        run(
            label,
            vec![case(
                label,
                Code::Ok,
                rpc!(
                    node,
                    node_publish_volume,
                    publish_req(&b, &stg, &t2, block(), true)
                ),
            )],
        )
        .await;
    }
    assert_eq!(
        mount_count(&t2),
        1,
        "one mount after a repeated read-only publish"
    );
    assert!(
        d.volume_loop_devices().len() <= 2,
        "a repeated read-only publish adds no device: {:?}",
        d.volume_loop_devices()
    );
    let meta = std::fs::metadata(&t1).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "a block device at target_path"
    );
    let data = pattern(9, 4096);
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&t1).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let st = node
        .clone()
        .node_get_volume_stats(stats(&b, &t1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.usage.len(),
        1,
        "block volumes report bytes only: {:?}",
        st.usage
    );
    assert_eq!(st.usage[0].unit, csi::volume_usage::Unit::Bytes as i32);
    assert_eq!(st.usage[0].total, 16 * MIB);
    assert_eq!(st.volume_condition.map(|c| c.abnormal), Some(false));
    let cases = vec![
        case(
            "NodeUnpublishVolume block: success → OK",
            Code::Ok,
            rpc!(node, node_unpublish_volume, unpublish_req(&b, &t1)),
        ),
        case(
            "NodeUnpublishVolume block readonly: success → OK",
            Code::Ok,
            rpc!(node, node_unpublish_volume, unpublish_req(&b, &t2)),
        ),
        case(
            "NodeUnpublishVolume block: repeated → OK",
            Code::Ok,
            rpc!(node, node_unpublish_volume, unpublish_req(&b, &t1)),
        ),
        case(
            "NodeUnstageVolume block: success → OK",
            Code::Ok,
            rpc!(node, node_unstage_volume, unstage_req(&b, &stg)),
        ),
        case(
            "NodeUnstageVolume block: repeated → OK",
            Code::Ok,
            rpc!(node, node_unstage_volume, unstage_req(&b, &stg)),
        ),
    ];
    run("block unpublish/unstage", cases).await;
    assert!(!t1.exists() && !t2.exists(), "block targets removed");
    let head = std::fs::read(d.volume_image(&b)).unwrap();
    assert_eq!(
        &head[..4096],
        &data[..],
        "the write through the target reached the volume"
    );
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- VolumeCondition ------------------------------------------------------------------------

/// spec.md "ListVolumes" / "ControllerGetVolume" VolumeStatus.volume_condition and
/// "NodeGetVolumeStats" volume_condition (VOLUME_CONDITION capabilities): a volume whose
/// backing image vanished behind the driver's back is reported abnormal, with a message.
#[tokio::test(flavor = "multi_thread")]
async fn volume_condition_reports_a_missing_image() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let node = d.node().await;
    let healthy = create_volume(&ctl, vol("cond-ok", 16 * MIB, block()))
        .await
        .volume_id;
    let idle = create_volume(&ctl, vol("cond-idle", 16 * MIB, block()))
        .await
        .volume_id;
    let used = create_volume(&ctl, vol("cond-used", 64 * MIB, ext4()))
        .await
        .volume_id;
    let target = stage_and_publish(&d, &used, &ext4(), "cond").await;

    let condition = |st: Option<csi::list_volumes_response::VolumeStatus>| {
        st.and_then(|s| s.volume_condition)
            .expect("volume_condition")
    };
    for e in list_volumes(&ctl).await {
        let c = condition(e.status);
        assert!(!c.abnormal, "healthy before: {c:?}");
    }
    std::fs::remove_file(d.volume_image(&idle)).unwrap();
    std::fs::remove_file(d.volume_image(&used)).unwrap();

    for e in list_volumes(&ctl).await {
        let id = e.volume.unwrap().volume_id;
        let c = condition(e.status);
        assert_eq!(
            c.abnormal,
            id != healthy,
            "ListVolumes condition of {id}: {c:?}"
        );
        assert!(!c.message.is_empty());
    }
    for (id, abnormal) in [(&healthy, false), (&idle, true), (&used, true)] {
        let c = get_volume(&ctl, id)
            .await
            .status
            .and_then(|s| s.volume_condition)
            .expect("volume_condition");
        assert_eq!(
            c.abnormal, abnormal,
            "ControllerGetVolume condition of {id}: {c:?}"
        );
        assert!(!c.message.is_empty());
    }
    let st = node
        .clone()
        .node_get_volume_stats(stats(&used, &target))
        .await
        .unwrap()
        .into_inner();
    let c = st.volume_condition.expect("volume_condition");
    assert!(
        c.abnormal && !c.message.is_empty(),
        "NodeGetVolumeStats condition: {c:?}"
    );

    // The broken volumes can still be torn down and deleted, and nothing of them stays.
    unpublish_and_unstage(&d, &used, "cond").await;
    assert_eq!(
        d.volume_loop_devices(),
        Vec::<String>::new(),
        "NodeUnstageVolume detaches the loop device of a volume whose image vanished"
    );
    delete_all(&ctl).await;
    d.assert_clean();
}

/// spec.md "NodePublishVolume": "readonly: Indicates SP MUST publish the volume in readonly
/// mode" — for access type block too: a write through a read-only block target must fail.
/// (A read-only bind mount of a device node does not stop writes to the device: the kernel
/// applies a mount's read-only flag to regular files, directories and symlinks only.)
#[tokio::test(flavor = "multi_thread")]
async fn read_only_block_publish_rejects_writes() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let b = create_volume(&ctl, vol("ro-block", 16 * MIB, block()))
        .await
        .volume_id;
    let stg = d.path("ro/staging");
    let target = d.path("ro/target");
    let mut node = d.node().await;
    node.node_stage_volume(stage_req(&b, &stg, block()))
        .await
        .unwrap();
    node.node_publish_volume(publish_req(&b, &stg, &target, block(), true))
        .await
        .unwrap();
    let opened = std::fs::OpenOptions::new().write(true).open(&target);
    let wrote = opened.and_then(|mut f| {
        f.write_all(&pattern(5, 4096))?;
        f.sync_all()
    });
    let head = std::fs::read(d.volume_image(&b)).unwrap();
    let reached = head[..4096] == pattern(5, 4096)[..];
    node.node_unpublish_volume(unpublish_req(&b, &target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&b, &stg))
        .await
        .unwrap();
    delete_all(&ctl).await;
    d.assert_clean();
    assert!(
        wrote.is_err() && !reached,
        "a write through a read-only block publish succeeded ({wrote:?}) and reached the volume: {reached}"
    );
}

// ---- Ids are never paths -------------------------------------------------------------------

/// docs/design.md "Ids are never paths", spec.md per-RPC "does not exist" rows: an id berth
/// could not have issued ("../../etc", "vol-../x", …) names nothing — NOT_FOUND for every
/// RPC that reads or uses it, OK for every delete/unpublish that removes it — and never
/// reaches the filesystem: decoy files where a naive path join would land stay untouched.
#[tokio::test(flavor = "multi_thread")]
async fn ids_are_never_paths() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let node = d.node().await;
    let grp = d.group().await;
    let real = create_volume(&ctl, vol("evil-real", 16 * MIB, block()))
        .await
        .volume_id;

    // Decoys where "<dir>/<id>.img|json" lands for ids "vol-../x", "snap-../x", "group-../x",
    // "../../etc" and "/etc/passwd".
    let berth_dir = d.pool_root().join("berth");
    let mut decoys = Vec::new();
    for dir in [
        berth_dir.join("volumes/vol-.."),
        berth_dir.join("snapshots/snap-.."),
        berth_dir.join("groups/group-.."),
        d.state_dir().join("node/vol-.."),
    ] {
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["x.img", "x.json"] {
            decoys.push(dir.join(f));
        }
    }
    for f in ["etc.img", "etc.json"] {
        decoys.push(d.pool_root().join(f));
        decoys.push(d.state_dir().join(f));
    }
    for p in &decoys {
        std::fs::write(p, b"decoy").unwrap();
    }
    let stg = d.path("evil/staging");
    let target = d.path("evil/target");

    let mut cases = Vec::new();
    for &id in EVIL_IDS {
        let nf = Code::NotFound;
        cases.extend([
            case(
                format!("ControllerGetVolume {id:?} → NOT_FOUND"),
                nf,
                rpc!(ctl, controller_get_volume, get_volume_req(id)),
            ),
            case(
                format!("ValidateVolumeCapabilities {id:?} → NOT_FOUND"),
                nf,
                rpc!(
                    ctl,
                    validate_volume_capabilities,
                    validate(id, vec![block()])
                ),
            ),
            case(
                format!("ControllerPublishVolume {id:?} → NOT_FOUND"),
                nf,
                rpc!(
                    ctl,
                    controller_publish_volume,
                    ctl_publish(id, NODE_ID, block(), false)
                ),
            ),
            case(
                format!("ControllerExpandVolume {id:?} → NOT_FOUND"),
                nf,
                rpc!(ctl, controller_expand_volume, expand_req(id, GIB, 0)),
            ),
            case(
                format!("ControllerModifyVolume {id:?} → NOT_FOUND"),
                nf,
                rpc!(
                    ctl,
                    controller_modify_volume,
                    modify(id, &[("preallocate", "true")])
                ),
            ),
            case(
                format!("CreateSnapshot of {id:?} → NOT_FOUND"),
                nf,
                rpc!(ctl, create_snapshot, snapshot_req("evil-snap", id)),
            ),
            case(
                format!("CreateVolume cloned from {id:?} → NOT_FOUND"),
                nf,
                rpc!(
                    ctl,
                    create_volume,
                    from_volume(vol("evil-clone", 16 * MIB, block()), id)
                ),
            ),
            case(
                format!("CreateVolume restored from {id:?} → NOT_FOUND"),
                nf,
                rpc!(
                    ctl,
                    create_volume,
                    from_snapshot(vol("evil-restore", 16 * MIB, block()), id)
                ),
            ),
            case(
                format!("CreateVolumeGroupSnapshot of {id:?} → NOT_FOUND"),
                nf,
                rpc!(
                    grp,
                    create_volume_group_snapshot,
                    group_snapshot_req("evil-group", &[&real, id])
                ),
            ),
            case(
                format!("GetSnapshot {id:?} → NOT_FOUND"),
                nf,
                rpc!(ctl, get_snapshot, get_snap(id)),
            ),
            case(
                format!("GetVolumeGroupSnapshot {id:?} → NOT_FOUND"),
                nf,
                rpc!(
                    grp,
                    get_volume_group_snapshot,
                    get_group_snapshot_req(id, &[NO_SNAP.to_string()])
                ),
            ),
            case(
                format!("NodeStageVolume {id:?} → NOT_FOUND"),
                nf,
                rpc!(node, node_stage_volume, stage_req(id, &stg, block())),
            ),
            case(
                format!("NodePublishVolume {id:?} → NOT_FOUND"),
                nf,
                rpc!(
                    node,
                    node_publish_volume,
                    publish_req(id, &stg, &target, block(), false)
                ),
            ),
            case(
                format!("NodeGetVolumeStats {id:?} → NOT_FOUND"),
                nf,
                rpc!(node, node_get_volume_stats, stats(id, &target)),
            ),
            case(
                format!("NodeExpandVolume {id:?} → NOT_FOUND"),
                nf,
                rpc!(node, node_expand_volume, node_expand(id, &target, None)),
            ),
            case(
                format!("NodeUnpublishVolume {id:?} (nothing mounted) → NOT_FOUND"),
                nf,
                rpc!(node, node_unpublish_volume, unpublish_req(id, &target)),
            ),
            case(
                format!("NodeUnstageVolume {id:?} (nothing mounted) → NOT_FOUND"),
                nf,
                rpc!(node, node_unstage_volume, unstage_req(id, &stg)),
            ),
            case(
                format!("DeleteVolume {id:?} → OK"),
                Code::Ok,
                rpc!(ctl, delete_volume, delete_volume_req(id)),
            ),
            case(
                format!("ControllerUnpublishVolume {id:?} → OK"),
                Code::Ok,
                rpc!(ctl, controller_unpublish_volume, ctl_unpublish(id, NODE_ID)),
            ),
            case(
                format!("DeleteSnapshot {id:?} → OK"),
                Code::Ok,
                rpc!(ctl, delete_snapshot, delete_snapshot_req(id)),
            ),
            case(
                format!("DeleteVolumeGroupSnapshot {id:?} → OK"),
                Code::Ok,
                rpc!(
                    grp,
                    delete_volume_group_snapshot,
                    delete_group_snapshot_req(id, &[NO_SNAP.to_string()])
                ),
            ),
        ]);
    }
    run("ids are never paths", cases).await;
    for p in &decoys {
        assert_eq!(
            std::fs::read(p).ok().as_deref(),
            Some(&b"decoy"[..]),
            "{} was touched",
            p.display()
        );
    }
    assert_eq!(
        list_volume_ids(&ctl).await,
        vec![real.clone()],
        "nothing was created"
    );
    assert_eq!(list_snapshot_ids(&ctl).await, Vec::<String>::new());
    assert!(!stg.exists() && !target.exists(), "no CO path was created");
    for dir in [
        berth_dir.join("volumes/vol-.."),
        berth_dir.join("snapshots/snap-.."),
        berth_dir.join("groups/group-.."),
    ] {
        std::fs::remove_dir_all(dir).unwrap();
    }
    for f in ["etc.img", "etc.json"] {
        std::fs::remove_file(d.pool_root().join(f)).unwrap();
    }
    delete_all(&ctl).await;
    d.assert_clean();
}

// ---- Concurrency: ABORTED for a second in-flight operation ----------------------------------

/// How long the failpoint holds the operation, and the share of it within which an answer
/// proves the case was served while the operation was still in flight.
const HOLD_MS: u64 = 1500;
const CONCLUSIVE_WITHIN: Duration = Duration::from_millis(HOLD_MS * 3 / 4);
const MAX_ROUNDS: usize = 12;

/// Waits until `ready()` holds: the held operation has reached its failpoint.
async fn wait_until(what: &str, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs `cases` against a driver whose `failpoint` holds one operation (`hold`, which returns
/// once the operation is held) for HOLD_MS.
///
/// A verdict only counts when the answer came back within CONCLUSIVE_WITHIN of the hold
/// starting, i.e. the server certainly served it while the held operation was in flight.
/// The `sleep` failpoint blocks a tokio worker thread in the server (std::thread::sleep in an
/// async task), and in about half of the holds the server's other worker is left parked with
/// nobody polling the I/O driver, so no request is even read until the hold ends (see the
/// report on src/util/failpoint.rs). Such a round is inconclusive: the cases still pending run
/// again against a fresh driver, so the test neither flakes nor passes on answers given after
/// the hold.
async fn held_rounds<Fx>(
    table: &str,
    failpoint: &str,
    setup: impl AsyncFn(&Driver) -> Fx,
    hold: impl AsyncFn(&Driver, &Fx) -> Held,
    cases: impl Fn(&Driver, &Fx, &Clients) -> Vec<Case>,
    after: impl AsyncFn(&Driver, &Fx),
) {
    let mut pending: Option<BTreeSet<String>> = None;
    let mut failures = Vec::new();
    let mut rounds = 0;
    let mut total = 0;
    while pending.as_ref().is_none_or(|p| !p.is_empty()) {
        rounds += 1;
        assert!(
            rounds <= MAX_ROUNDS,
            "{table}: {} cases still inconclusive after {MAX_ROUNDS} rounds: the server stalls \
             while an operation is held at a failpoint: {:?}",
            pending.as_ref().map_or(0, |p| p.len()),
            pending
        );
        let d = Driver::start_with(Options {
            failpoint: Some(format!("{failpoint}:sleep={HOLD_MS}")),
            ..Default::default()
        })
        .await;
        let fx = setup(&d).await;
        let clients = Clients {
            ctl: d.controller().await,
            node: d.node().await,
            grp: d.group().await,
        };
        let all = cases(&d, &fx, &clients);
        let todo = pending.get_or_insert_with(|| all.iter().map(|c| c.label.clone()).collect());
        total = total.max(all.len());
        // Noise while the held call arrives: cheap calls on several connections keep the
        // server's workers waking each other, which makes a stalled round less likely.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut noise = Vec::new();
        for _ in 0..4 {
            let mut id = d.identity().await;
            let stop = stop.clone();
            noise.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = id.get_plugin_info(csi::GetPluginInfoRequest {}).await;
                }
            }));
        }
        let held = hold(&d, &fx).await;
        let t0 = Instant::now();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let now: Vec<Case> = all
            .into_iter()
            .filter(|c| todo.contains(&c.label))
            .collect();
        for c in now {
            let (got, msg) = match c.call.await {
                Ok(()) => (Code::Ok, String::new()),
                Err(s) => (s.code(), s.message().to_string()),
            };
            if t0.elapsed() > CONCLUSIVE_WITHIN {
                break; // this answer and every later one may postdate the hold
            }
            todo.remove(&c.label);
            if got != c.want {
                failures.push(format!(
                    "  [{}] want {:?}, got {got:?} {msg:?}",
                    c.label, c.want
                ));
            }
        }
        for n in noise {
            n.await.unwrap();
        }
        held.0
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{table}: the held operation failed: {e:?}"));
        assert!(
            d.log().contains("failpoint reached, holding"),
            "{table}: the failpoint held nothing"
        );
        after(&d, &fx).await;
    }
    eprintln!("{table}: {} cases, {rounds} round(s)", total);
    assert!(
        failures.is_empty(),
        "{table}: {} cases failed (in {rounds} rounds):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The held call, in flight (a handle, not awaited by the closure that starts it).
struct Held(tokio::task::JoinHandle<Result<(), Status>>);

/// Clients for a table's cases, one connection each.
struct Clients {
    ctl: Ctl,
    node: NodeClient<Channel>,
    grp: GroupControllerClient<Channel>,
}

/// A call that fails with INTERNAL unless `check` holds (a condition as a table case).
fn check(what: &'static str, f: impl Future<Output = bool> + Send + 'static) -> Call {
    Box::pin(async move {
        if f.await {
            Ok(())
        } else {
            Err(Status::internal(what))
        }
    })
}

/// spec.md "Concurrency" and "Error Scheme": Operation pending for volume → 10 ABORTED. A
/// CreateVolume is held after recording the volume (failpoint), and every call on the same
/// volume meanwhile — a second CreateVolume of the same name included — answers ABORTED; the
/// volume is invisible until created; a retry once the first call returned is OK.
#[tokio::test(flavor = "multi_thread")]
async fn aborted_while_create_volume_in_flight() {
    struct Fx {
        id: String,
    }
    let req = || vol("held", 64 * MIB, ext4());
    held_rounds(
        "CreateVolume in flight",
        "create-volume:after-record",
        async |_d: &Driver| Fx {
            id: berth::storage::VolumeId::for_name("held").to_string(),
        },
        async |d: &Driver, fx: &Fx| {
            // The held call gets a connection of its own.
            let h = tokio::spawn(rpc!(d.controller().await, create_volume, req()));
            let rec = d.pool_root().join(format!("berth/volumes/{}.json", fx.id));
            wait_until("the volume record", || rec.exists()).await;
            Held(h)
        },
        |d: &Driver, fx: &Fx, c: &Clients| {
            let (ctl, node, grp) = (&c.ctl, &c.node, &c.grp);
            let id = fx.id.as_str();
            let stg = d.path("held/staging");
            let target = d.path("held/target");
            let ab = Code::Aborted;
            let lister = ctl.clone();
            let hidden = id.to_string();
            vec![
                case(
                    "Concurrency: CreateVolume of the same name → ABORTED",
                    ab,
                    rpc!(ctl, create_volume, req()),
                ),
                case(
                    "Concurrency: DeleteVolume → ABORTED",
                    ab,
                    rpc!(ctl, delete_volume, delete_volume_req(id)),
                ),
                case(
                    "Concurrency: ControllerPublishVolume → ABORTED",
                    ab,
                    rpc!(
                        ctl,
                        controller_publish_volume,
                        ctl_publish(id, NODE_ID, ext4(), false)
                    ),
                ),
                case(
                    "Concurrency: ControllerUnpublishVolume → ABORTED",
                    ab,
                    rpc!(ctl, controller_unpublish_volume, ctl_unpublish(id, NODE_ID)),
                ),
                case(
                    "Concurrency: ControllerExpandVolume → ABORTED",
                    ab,
                    rpc!(ctl, controller_expand_volume, expand_req(id, GIB, 0)),
                ),
                case(
                    "Concurrency: ControllerModifyVolume → ABORTED",
                    ab,
                    rpc!(
                        ctl,
                        controller_modify_volume,
                        modify(id, &[("preallocate", "true")])
                    ),
                ),
                case(
                    "Concurrency: CreateSnapshot of it → ABORTED",
                    ab,
                    rpc!(ctl, create_snapshot, snapshot_req("held-snap", id)),
                ),
                case(
                    "Concurrency: CreateVolume cloned from it → ABORTED",
                    ab,
                    rpc!(
                        ctl,
                        create_volume,
                        from_volume(vol("held-clone", 64 * MIB, ext4()), id)
                    ),
                ),
                case(
                    "Concurrency: CreateVolumeGroupSnapshot of it → ABORTED",
                    ab,
                    rpc!(
                        grp,
                        create_volume_group_snapshot,
                        group_snapshot_req("held-group", &[id])
                    ),
                ),
                case(
                    "Concurrency: NodeStageVolume → ABORTED",
                    ab,
                    rpc!(node, node_stage_volume, stage_req(id, &stg, ext4())),
                ),
                case(
                    "Concurrency: NodeUnstageVolume → ABORTED",
                    ab,
                    rpc!(node, node_unstage_volume, unstage_req(id, &stg)),
                ),
                case(
                    "Concurrency: NodePublishVolume → ABORTED",
                    ab,
                    rpc!(
                        node,
                        node_publish_volume,
                        publish_req(id, &stg, &target, ext4(), false)
                    ),
                ),
                case(
                    "Concurrency: NodeUnpublishVolume → ABORTED",
                    ab,
                    rpc!(node, node_unpublish_volume, unpublish_req(id, &target)),
                ),
                case(
                    "Concurrency: NodeExpandVolume → ABORTED",
                    ab,
                    rpc!(node, node_expand_volume, node_expand(id, &target, None)),
                ),
                case(
                    "ControllerGetVolume of a volume still being created → NOT_FOUND",
                    Code::NotFound,
                    rpc!(ctl, controller_get_volume, get_volume_req(id)),
                ),
                case(
                    "ValidateVolumeCapabilities of a volume still being created → NOT_FOUND",
                    Code::NotFound,
                    rpc!(
                        ctl,
                        validate_volume_capabilities,
                        validate(id, vec![ext4()])
                    ),
                ),
                case(
                    "ListVolumes hides a volume being created → OK",
                    Code::Ok,
                    check("listed", async move {
                        !list_volume_ids(&lister).await.contains(&hidden)
                    }),
                ),
            ]
        },
        async |d: &Driver, fx: &Fx| {
            let ctl = d.controller().await;
            let v = create_volume(&ctl, req()).await;
            assert_eq!(
                v.volume_id, fx.id,
                "a retry after the first call returned is OK"
            );
        },
    )
    .await;
}

/// design.md "Concurrency": sixteen simultaneous CreateVolume calls with one name produce one
/// volume; each caller gets OK or ABORTED, and a retry gets OK.
#[tokio::test(flavor = "multi_thread")]
async fn simultaneous_creates_make_one_volume() {
    let d = Driver::start_with(Options {
        failpoint: Some(format!("create-volume:after-record:sleep={HOLD_MS}")),
        ..Default::default()
    })
    .await;
    let ctl = d.controller().await;
    let mut burst = Vec::new();
    for _ in 0..16 {
        let c = d.controller().await;
        burst.push(tokio::spawn(rpc!(
            c,
            create_volume,
            vol("burst", 16 * MIB, block())
        )));
    }
    let mut codes = Vec::new();
    for h in burst {
        codes.push(match h.await.unwrap() {
            Ok(()) => Code::Ok,
            Err(s) => s.code(),
        });
    }
    assert!(codes.contains(&Code::Ok), "{codes:?}");
    assert!(
        codes.iter().all(|c| matches!(c, Code::Ok | Code::Aborted)),
        "{codes:?}"
    );
    let v = create_volume(&ctl, vol("burst", 16 * MIB, block())).await;
    assert_eq!(
        list_volume_ids(&ctl).await,
        vec![v.volume_id],
        "one volume per name"
    );
    assert_eq!(volume_images(&d), 1);
    delete_all(&ctl).await;
    d.assert_clean();
}

/// spec.md "CreateSnapshot Errors" / "DeleteSnapshot Errors": Operation pending for snapshot →
/// 10 ABORTED, and "Concurrency" for the snapshot's source volume. A CreateSnapshot is held
/// after recording the snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn aborted_while_create_snapshot_in_flight() {
    struct Fx {
        src: String,
        other: String,
        sid: String,
    }
    held_rounds(
        "CreateSnapshot in flight",
        "create-snapshot:after-record",
        async |d: &Driver| {
            let ctl = d.controller().await;
            Fx {
                src: create_volume(&ctl, vol("held-src", 16 * MIB, block()))
                    .await
                    .volume_id,
                other: create_volume(&ctl, vol("held-other", 16 * MIB, block()))
                    .await
                    .volume_id,
                sid: berth::storage::SnapshotId::for_name("held-snap").to_string(),
            }
        },
        async |d: &Driver, fx: &Fx| {
            let h = tokio::spawn(rpc!(
                d.controller().await,
                create_snapshot,
                snapshot_req("held-snap", &fx.src)
            ));
            let rec = d
                .pool_root()
                .join(format!("berth/snapshots/{}.json", fx.sid));
            wait_until("the snapshot record", || rec.exists()).await;
            Held(h)
        },
        |d: &Driver, fx: &Fx, c: &Clients| {
            let (ctl, node, grp) = (&c.ctl, &c.node, &c.grp);
            let (src, other, sid) = (fx.src.as_str(), fx.other.as_str(), fx.sid.as_str());
            let ab = Code::Aborted;
            let lister = ctl.clone();
            vec![
                case(
                    "CreateSnapshot Errors: Operation pending (same request) → ABORTED",
                    ab,
                    rpc!(ctl, create_snapshot, snapshot_req("held-snap", src)),
                ),
                case(
                    "CreateSnapshot Errors: Operation pending (same name, other source) → ABORTED",
                    ab,
                    rpc!(ctl, create_snapshot, snapshot_req("held-snap", other)),
                ),
                case(
                    "DeleteSnapshot Errors: Operation pending for snapshot → ABORTED",
                    ab,
                    rpc!(ctl, delete_snapshot, delete_snapshot_req(sid)),
                ),
                case(
                    "Concurrency: CreateVolume restored from the pending snapshot → ABORTED",
                    ab,
                    rpc!(
                        ctl,
                        create_volume,
                        from_snapshot(vol("held-restore", 16 * MIB, block()), sid)
                    ),
                ),
                case(
                    "Concurrency: DeleteVolume of the source → ABORTED",
                    ab,
                    rpc!(ctl, delete_volume, delete_volume_req(src)),
                ),
                case(
                    "Concurrency: ControllerExpandVolume of the source → ABORTED",
                    ab,
                    rpc!(ctl, controller_expand_volume, expand_req(src, GIB, 0)),
                ),
                case(
                    "Concurrency: NodeStageVolume of the source → ABORTED",
                    ab,
                    rpc!(
                        node,
                        node_stage_volume,
                        stage_req(src, &d.path("hs/staging"), block())
                    ),
                ),
                case(
                    "Concurrency: CreateVolumeGroupSnapshot of the source → ABORTED",
                    ab,
                    rpc!(
                        grp,
                        create_volume_group_snapshot,
                        group_snapshot_req("held-group", &[other, src])
                    ),
                ),
                case(
                    "GetSnapshot of a snapshot still being cut → NOT_FOUND",
                    Code::NotFound,
                    rpc!(ctl, get_snapshot, get_snap(sid)),
                ),
                case(
                    "ListSnapshots hides a snapshot being cut → OK",
                    Code::Ok,
                    check("listed", async move {
                        list_snapshot_ids(&lister).await.is_empty()
                    }),
                ),
                case(
                    "ControllerGetVolume of another volume → OK",
                    Code::Ok,
                    rpc!(ctl, controller_get_volume, get_volume_req(other)),
                ),
            ]
        },
        async |d: &Driver, fx: &Fx| {
            let ctl = d.controller().await;
            let s = create_snapshot(&ctl, "held-snap", &fx.src).await;
            assert_eq!(
                s.snapshot_id, fx.sid,
                "a retry after the first call returned is OK"
            );
        },
    )
    .await;
}

/// spec.md "Concurrency" on the node: a NodePublishVolume held after mounting makes every
/// other call on that volume ABORTED; a repeat once the publish returned is OK.
#[tokio::test(flavor = "multi_thread")]
async fn aborted_while_node_publish_in_flight() {
    struct Fx {
        v: String,
        stg: PathBuf,
        target: PathBuf,
    }
    held_rounds(
        "NodePublishVolume in flight",
        "node-publish:after-mount",
        async |d: &Driver| {
            let v = create_volume(&d.controller().await, vol("held-pub", 64 * MIB, ext4()))
                .await
                .volume_id;
            let stg = d.path("hp/staging");
            d.node()
                .await
                .node_stage_volume(stage_req(&v, &stg, ext4()))
                .await
                .expect("stage");
            Fx {
                v,
                stg,
                target: d.path("hp/target"),
            }
        },
        async |d: &Driver, fx: &Fx| {
            let h = tokio::spawn(rpc!(
                d.node().await,
                node_publish_volume,
                publish_req(&fx.v, &fx.stg, &fx.target, ext4(), false)
            ));
            wait_until("the target mount", || is_mounted(&fx.target)).await;
            Held(h)
        },
        |d: &Driver, fx: &Fx, c: &Clients| {
            let (ctl, node) = (&c.ctl, &c.node);
            let (v, stg, target) = (fx.v.as_str(), &fx.stg, &fx.target);
            let ab = Code::Aborted;
            vec![
                case(
                    "Concurrency: NodePublishVolume repeated while in flight → ABORTED",
                    ab,
                    rpc!(
                        node,
                        node_publish_volume,
                        publish_req(v, stg, target, ext4(), false)
                    ),
                ),
                case(
                    "Concurrency: NodePublishVolume at another target → ABORTED",
                    ab,
                    rpc!(
                        node,
                        node_publish_volume,
                        publish_req(v, stg, &d.path("hp/target2"), ext4(), false)
                    ),
                ),
                case(
                    "Concurrency: NodeUnpublishVolume → ABORTED",
                    ab,
                    rpc!(node, node_unpublish_volume, unpublish_req(v, target)),
                ),
                case(
                    "Concurrency: NodeStageVolume → ABORTED",
                    ab,
                    rpc!(node, node_stage_volume, stage_req(v, stg, ext4())),
                ),
                case(
                    "Concurrency: NodeUnstageVolume → ABORTED",
                    ab,
                    rpc!(node, node_unstage_volume, unstage_req(v, stg)),
                ),
                case(
                    "Concurrency: NodeExpandVolume → ABORTED",
                    ab,
                    rpc!(node, node_expand_volume, node_expand(v, target, None)),
                ),
                case(
                    "Concurrency: DeleteVolume → ABORTED",
                    ab,
                    rpc!(ctl, delete_volume, delete_volume_req(v)),
                ),
                case(
                    "Concurrency: ControllerExpandVolume → ABORTED",
                    ab,
                    rpc!(ctl, controller_expand_volume, expand_req(v, GIB, 0)),
                ),
                case(
                    "NodeGetVolumeStats (read-only, unguarded) → OK",
                    Code::Ok,
                    rpc!(node, node_get_volume_stats, stats(v, stg)),
                ),
            ]
        },
        async |d: &Driver, fx: &Fx| {
            let mut node = d.node().await;
            node.node_publish_volume(publish_req(&fx.v, &fx.stg, &fx.target, ext4(), false))
                .await
                .expect("a repeat once the publish returned");
            node.node_unpublish_volume(unpublish_req(&fx.v, &fx.target))
                .await
                .unwrap();
            node.node_unstage_volume(unstage_req(&fx.v, &fx.stg))
                .await
                .unwrap();
        },
    )
    .await;
}

/// spec.md "Concurrency" on the node: a NodeStageVolume held after mounting makes every other
/// call on that volume ABORTED; a publish once the stage returned is OK.
#[tokio::test(flavor = "multi_thread")]
async fn aborted_while_node_stage_in_flight() {
    struct Fx {
        v: String,
        stg: PathBuf,
        target: PathBuf,
    }
    held_rounds(
        "NodeStageVolume in flight",
        "node-stage:after-mount",
        async |d: &Driver| Fx {
            v: create_volume(&d.controller().await, vol("held-stage", 64 * MIB, ext4()))
                .await
                .volume_id,
            stg: d.path("hn/staging"),
            target: d.path("hn/target"),
        },
        async |d: &Driver, fx: &Fx| {
            let h = tokio::spawn(rpc!(
                d.node().await,
                node_stage_volume,
                stage_req(&fx.v, &fx.stg, ext4())
            ));
            wait_until("the staging mount", || is_mounted(&fx.stg)).await;
            Held(h)
        },
        |_d: &Driver, fx: &Fx, c: &Clients| {
            let (ctl, node, grp) = (&c.ctl, &c.node, &c.grp);
            let (v, stg, target) = (fx.v.as_str(), &fx.stg, &fx.target);
            let ab = Code::Aborted;
            vec![
                case(
                    "Concurrency: NodeStageVolume repeated while in flight → ABORTED",
                    ab,
                    rpc!(node, node_stage_volume, stage_req(v, stg, ext4())),
                ),
                case(
                    "Concurrency: NodeUnstageVolume → ABORTED",
                    ab,
                    rpc!(node, node_unstage_volume, unstage_req(v, stg)),
                ),
                case(
                    "Concurrency: NodePublishVolume → ABORTED",
                    ab,
                    rpc!(
                        node,
                        node_publish_volume,
                        publish_req(v, stg, target, ext4(), false)
                    ),
                ),
                case(
                    "Concurrency: NodeExpandVolume → ABORTED",
                    ab,
                    rpc!(node, node_expand_volume, node_expand(v, stg, None)),
                ),
                case(
                    "Concurrency: DeleteVolume → ABORTED",
                    ab,
                    rpc!(ctl, delete_volume, delete_volume_req(v)),
                ),
                case(
                    "Concurrency: ControllerPublishVolume → ABORTED",
                    ab,
                    rpc!(
                        ctl,
                        controller_publish_volume,
                        ctl_publish(v, NODE_ID, ext4(), false)
                    ),
                ),
                case(
                    "Concurrency: CreateSnapshot → ABORTED",
                    ab,
                    rpc!(ctl, create_snapshot, snapshot_req("held-stage-snap", v)),
                ),
                case(
                    "Concurrency: CreateVolumeGroupSnapshot → ABORTED",
                    ab,
                    rpc!(
                        grp,
                        create_volume_group_snapshot,
                        group_snapshot_req("held-stage-group", &[v])
                    ),
                ),
            ]
        },
        async |d: &Driver, fx: &Fx| {
            let mut node = d.node().await;
            node.node_publish_volume(publish_req(&fx.v, &fx.stg, &fx.target, ext4(), false))
                .await
                .expect("publish once the stage returned");
            node.node_unpublish_volume(unpublish_req(&fx.v, &fx.target))
                .await
                .unwrap();
            node.node_unstage_volume(unstage_req(&fx.v, &fx.stg))
                .await
                .unwrap();
        },
    )
    .await;
}

// ---- SnapshotMetadata ------------------------------------------------------------------

type Meta = csi::snapshot_metadata_client::SnapshotMetadataClient<Channel>;

/// Every (offset, size) of a GetMetadataAllocated stream, checking the stream's own rules
/// on the way (one style, one capacity, at most max_results per message, strictly
/// increasing and non-overlapping).
async fn meta_allocated(
    meta: &Meta,
    req: csi::GetMetadataAllocatedRequest,
) -> Result<Vec<(i64, i64)>, Status> {
    let max = req.max_results;
    let mut s = meta.clone().get_metadata_allocated(req).await?.into_inner();
    let mut out: Vec<(i64, i64)> = Vec::new();
    while let Some(m) = s.message().await? {
        assert_eq!(
            m.block_metadata_type,
            csi::BlockMetadataType::VariableLength as i32
        );
        assert!(m.volume_capacity_bytes > 0);
        assert!(max <= 0 || m.block_metadata.len() <= max as usize);
        for b in m.block_metadata {
            assert!(b.size_bytes > 0);
            if let Some(&(o, l)) = out.last() {
                assert!(o + l <= b.byte_offset, "ranges overlap or go backwards");
            }
            out.push((b.byte_offset, b.size_bytes));
        }
    }
    Ok(out)
}

async fn meta_delta(
    meta: &Meta,
    req: csi::GetMetadataDeltaRequest,
) -> Result<Vec<(i64, i64)>, Status> {
    let mut s = meta.clone().get_metadata_delta(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend(
            m.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    }
    Ok(out)
}

fn alloc_req(id: &str, offset: i64, max: i32) -> csi::GetMetadataAllocatedRequest {
    csi::GetMetadataAllocatedRequest {
        snapshot_id: id.into(),
        starting_offset: offset,
        max_results: max,
        ..Default::default()
    }
}

fn delta_req(base: &str, target: &str, offset: i64) -> csi::GetMetadataDeltaRequest {
    csi::GetMetadataDeltaRequest {
        base_snapshot_id: base.into(),
        target_snapshot_id: target.into(),
        starting_offset: offset,
        ..Default::default()
    }
}

fn write_image_at(image: &Path, offset: u64, len: usize, byte: u8) {
    let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&vec![byte; len]).unwrap();
    f.sync_all().unwrap();
}

/// spec.md "SnapshotMetadata Service": GetMetadataAllocated and GetMetadataDelta report
/// the allocated and the changed ranges, honour starting_offset and max_results, and use
/// the error codes of their tables.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_metadata_allocated_and_delta() {
    let d = Driver::start().await;
    let ctl = d.controller().await;
    let meta = Meta::new(d.channel().await);
    let v = create_volume(&ctl, vol("md", 64 * MIB, block())).await;
    let image = d.volume_image(&v.volume_id);
    write_image_at(&image, 0, 1 << 20, 1);
    write_image_at(&image, 32 << 20, 1 << 20, 2);
    let s1 = create_snapshot(&ctl, "md-1", &v.volume_id).await;
    write_image_at(&image, 48 << 20, 64 << 10, 3);
    let s2 = create_snapshot(&ctl, "md-2", &v.volume_id).await;
    let other = create_volume(&ctl, vol("md-other", 8 * MIB, block())).await;
    let s3 = create_snapshot(&ctl, "md-3", &other.volume_id).await;

    let all = meta_allocated(&meta, alloc_req(&s1.snapshot_id, 0, 0))
        .await
        .unwrap();
    assert_eq!(
        all,
        vec![(0, 1 << 20), (32 << 20, 1 << 20)],
        "allocated ranges of s1"
    );
    assert_eq!(
        meta_allocated(&meta, alloc_req(&s1.snapshot_id, 0, 0))
            .await
            .unwrap(),
        all,
        "idempotent"
    );
    assert_eq!(
        meta_allocated(&meta, alloc_req(&s1.snapshot_id, (1 << 20) - 4096, 1))
            .await
            .unwrap(),
        vec![((1 << 20) - 4096, 4096), (32 << 20, 1 << 20)],
        "starting_offset cuts the first range; max_results=1 per message"
    );
    let changed = meta_delta(&meta, delta_req(&s1.snapshot_id, &s2.snapshot_id, 0))
        .await
        .unwrap();
    assert_eq!(
        changed,
        vec![(48 << 20, 64 << 10)],
        "only the 64 KiB written between them"
    );
    assert_eq!(
        meta_delta(&meta, delta_req(&s2.snapshot_id, &s2.snapshot_id, 0))
            .await
            .unwrap(),
        vec![],
        "a snapshot against itself"
    );

    let unknown = "snap-00000000000000000000000000000000";
    let (m, a, b) = (meta.clone(), s1.snapshot_id.clone(), s2.snapshot_id.clone());
    let alloc = move |req: csi::GetMetadataAllocatedRequest| -> Call {
        let m = m.clone();
        Box::pin(async move { meta_allocated(&m, req).await.map(|_| ()) })
    };
    let m2 = meta.clone();
    let dl = move |req: csi::GetMetadataDeltaRequest| -> Call {
        let m = m2.clone();
        Box::pin(async move { meta_delta(&m, req).await.map(|_| ()) })
    };
    run(
        "SnapshotMetadata",
        vec![
            missing(
                "GetMetadataAllocated",
                "snapshot_id",
                alloc(alloc_req("", 0, 0)),
            ),
            case(
                "GetMetadataAllocated: unknown snapshot → NOT_FOUND",
                Code::NotFound,
                alloc(alloc_req(unknown, 0, 0)),
            ),
            case(
                "GetMetadataAllocated: malformed id → NOT_FOUND",
                Code::NotFound,
                alloc(alloc_req("../../etc", 0, 0)),
            ),
            case(
                "GetMetadataAllocated: negative starting_offset → OUT_OF_RANGE",
                Code::OutOfRange,
                alloc(alloc_req(&a, -1, 0)),
            ),
            case(
                "GetMetadataAllocated: starting_offset past the volume → OUT_OF_RANGE",
                Code::OutOfRange,
                alloc(alloc_req(&a, 65 << 20, 0)),
            ),
            case(
                "GetMetadataAllocated: negative max_results → INVALID_ARGUMENT",
                Code::InvalidArgument,
                alloc(alloc_req(&a, 0, -1)),
            ),
            case(
                "GetMetadataAllocated: starting_offset at the end → OK, nothing",
                Code::Ok,
                alloc(alloc_req(&a, 64 << 20, 0)),
            ),
            missing(
                "GetMetadataDelta",
                "base_snapshot_id",
                dl(delta_req("", &b, 0)),
            ),
            missing(
                "GetMetadataDelta",
                "target_snapshot_id",
                dl(delta_req(&a, "", 0)),
            ),
            case(
                "GetMetadataDelta: unknown base → NOT_FOUND",
                Code::NotFound,
                dl(delta_req(unknown, &b, 0)),
            ),
            case(
                "GetMetadataDelta: unknown target → NOT_FOUND",
                Code::NotFound,
                dl(delta_req(&a, unknown, 0)),
            ),
            case(
                "GetMetadataDelta: snapshots of different volumes → INVALID_ARGUMENT",
                Code::InvalidArgument,
                dl(delta_req(&a, &s3.snapshot_id, 0)),
            ),
            case(
                "GetMetadataDelta: negative starting_offset → OUT_OF_RANGE",
                Code::OutOfRange,
                dl(delta_req(&a, &b, -5)),
            ),
        ],
    )
    .await;
}
