//! Crash recovery: for every failpoint in berth, the process is SIGKILLed half-way through
//! the operation, restarted on the same state dir, and the CO's retry (or its change of mind:
//! a delete instead of the retry) must succeed with the right result, lose nothing that was
//! acknowledged before the crash, and leave nothing behind once everything is deleted.
//!
//! Every case runs on a driver that already holds a volume staged and published with known
//! data, so each crash also checks that reconcile leaves complete stages mounted and usable.

mod common;

use std::{os::unix::process::ExitStatusExt, path::Path, time::Duration};

use berth::storage::{GroupSnapshotId, SnapshotId, VolumeId};
use common::*;
use tonic::{Code, Status};

/// Size of every test volume: big enough for ext4 and the data, small enough to be quick.
const VOL: i64 = 64 * MIB;
/// The expansion case uses XFS: growing ext4 online needs CAP_SYS_RESOURCE, which test
/// sandboxes often drop, and XFS's smallest filesystem is 300 MiB.
const XFS_VOL: i64 = 304 * MIB;
const EXPANDED: i64 = 640 * MIB;
/// What the blank ext4 volume is grown to.
const GROWN: i64 = 2 * VOL;
const DATA: usize = 4 << 20;
const SRC_SEED: u64 = 11;
const OTHER_SEED: u64 = 22;
/// How long a write to a thawed filesystem may take before it counts as blocked.
const WRITE_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Blank,
    Snapshot,
    Volume,
}

/// The RPC interrupted by the crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    CreateVolume(Source),
    DeleteVolume,
    /// Grow the second volume: `staged` = an XFS volume in use (grown online afterwards),
    /// else a blank ext4 volume never staged yet.
    ExpandVolume {
        staged: bool,
    },
    CreateSnapshot,
    DeleteSnapshot,
    /// Stage the second volume; `blank` means it was never formatted.
    Stage {
        blank: bool,
    },
    Unstage,
    Publish,
    GroupSnapshot,
    /// Delete a ready group snapshot of both volumes.
    DeleteGroup,
}

/// What the CO does after the restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Issue the same RPC again.
    Retry,
    /// Give up: delete (or unstage/unpublish) what the interrupted RPC was creating.
    Undo,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    failpoint: &'static str,
    op: Op,
    then: Then,
}

macro_rules! crash_cases {
    ($($name:ident: $fp:literal, $op:expr, $then:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                run(Case { failpoint: $fp, op: $op, then: $then }).await;
            }
        )*
        /// Every failpoint this file crashes at.
        const COVERED: &[&str] = &[$($fp),*];
    };
}

crash_cases! {
    create_volume_after_record: "create-volume:after-record", Op::CreateVolume(Source::Blank), Then::Retry;
    create_volume_after_image: "create-volume:after-image", Op::CreateVolume(Source::Blank), Then::Retry;
    create_volume_after_rename: "create-volume:after-rename", Op::CreateVolume(Source::Blank), Then::Retry;
    restore_after_image: "create-volume:after-image", Op::CreateVolume(Source::Snapshot), Then::Retry;
    clone_after_rename: "create-volume:after-rename", Op::CreateVolume(Source::Volume), Then::Retry;
    clone_after_image_then_delete: "create-volume:after-image", Op::CreateVolume(Source::Volume), Then::Undo;
    create_volume_after_rename_then_delete: "create-volume:after-rename", Op::CreateVolume(Source::Blank), Then::Undo;
    delete_volume_after_mark: "delete-volume:after-mark", Op::DeleteVolume, Then::Retry;
    expand_volume_after_truncate: "expand-volume:after-truncate", Op::ExpandVolume { staged: true }, Then::Retry;
    expand_blank_after_truncate: "expand-volume:after-truncate", Op::ExpandVolume { staged: false }, Then::Retry;
    expand_blank_after_truncate_then_give_up: "expand-volume:after-truncate", Op::ExpandVolume { staged: false }, Then::Undo;
    create_snapshot_after_record: "create-snapshot:after-record", Op::CreateSnapshot, Then::Retry;
    create_snapshot_after_copy: "create-snapshot:after-copy", Op::CreateSnapshot, Then::Retry;
    create_snapshot_after_copy_then_delete: "create-snapshot:after-copy", Op::CreateSnapshot, Then::Undo;
    delete_snapshot_after_mark: "delete-snapshot:after-mark", Op::DeleteSnapshot, Then::Retry;
    node_stage_after_attach: "node-stage:after-attach", Op::Stage { blank: false }, Then::Retry;
    node_stage_after_attach_blank: "node-stage:after-attach", Op::Stage { blank: true }, Then::Retry;
    node_stage_after_mkfs: "node-stage:after-mkfs", Op::Stage { blank: true }, Then::Retry;
    node_stage_after_mount: "node-stage:after-mount", Op::Stage { blank: false }, Then::Retry;
    node_stage_after_mount_then_unstage: "node-stage:after-mount", Op::Stage { blank: false }, Then::Undo;
    node_unstage_after_unmount: "node-unstage:after-unmount", Op::Unstage, Then::Retry;
    node_publish_after_mount: "node-publish:after-mount", Op::Publish, Then::Retry;
    node_publish_after_mount_then_unpublish: "node-publish:after-mount", Op::Publish, Then::Undo;
    group_snapshot_while_frozen: "group-snapshot:while-frozen", Op::GroupSnapshot, Then::Retry;
    group_snapshot_while_frozen_then_delete: "group-snapshot:while-frozen", Op::GroupSnapshot, Then::Undo;
    // finish_snapshot runs for each member: the crash is after the thaw, one member cut.
    group_snapshot_member_after_copy: "create-snapshot:after-copy", Op::GroupSnapshot, Then::Retry;
    group_snapshot_after_members: "group-snapshot:after-members", Op::GroupSnapshot, Then::Retry;
    group_snapshot_after_members_then_delete: "group-snapshot:after-members", Op::GroupSnapshot, Then::Undo;
    delete_group_member_after_mark: "delete-snapshot:after-mark", Op::DeleteGroup, Then::Retry;
}

/// A failpoint added to the source without a crash case here fails this test.
#[test]
fn every_failpoint_has_a_crash_case() {
    let mut found = Vec::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for part in text.split("failpoint::hit(\"").skip(1) {
                    let name = part.split('"').next().unwrap().to_string();
                    found.push((name, p.clone()));
                }
            }
        }
    }
    assert!(found.len() >= 14, "failpoints found: {found:?}");
    // Hand-off, replication and failover failpoints are exercised by the multi-node tests.
    let cluster_tests = ["tests/cluster.rs", "tests/failover.rs"]
        .iter()
        .map(|f| std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(f)).unwrap())
        .collect::<String>();
    for (name, file) in found {
        assert!(
            COVERED.contains(&name.as_str()) || cluster_tests.contains(&format!("\"{name}")),
            "failpoint {name:?} in {} has no crash case in tests/crash.rs, tests/cluster.rs or tests/failover.rs",
            file.display()
        );
    }
}

// ---- the scenario ----------------------------------------------------------------------

/// What the preconditions created, and what must be cleaned up at the end.
struct Fixture {
    cap: csi::VolumeCapability,
    /// Staged and published at "src" throughout, holding `data` = pattern(src_seed).
    src: String,
    src_seed: u64,
    /// A second volume, when the operation needs one.
    other: Option<String>,
    /// A snapshot of `src` holding pattern(SRC_SEED).
    snap: Option<String>,
    /// (volume id, mount name) pairs to unpublish and unstage at the end.
    mounts: Vec<(String, String)>,
    /// Group snapshots to delete: (group id, member snapshot ids).
    groups: Vec<(String, Vec<String>)>,
    /// The group snapshot the operation deletes.
    group: Option<(String, Vec<String>)>,
}

impl Fixture {
    fn other(&self) -> &str {
        self.other.as_deref().expect("the case has a second volume")
    }
}

/// The result of an operation that answers with something to check.
#[derive(Debug)]
enum Done {
    Nothing,
    Volume(csi::Volume),
    Expanded(i64),
    Snapshot(csi::Snapshot),
    Group(csi::VolumeGroupSnapshot),
}

async fn run(case: Case) {
    let mut d = Driver::start().await;
    let mut fx = setup(&d, case.op).await;

    // Crash half-way through the operation.
    d.restart(Some(case.failpoint)).await;
    let r = issue(&d, &fx, case.op).await;
    assert!(
        r.is_err(),
        "{case:?}: the RPC answered although the process was to die at the failpoint: {r:?}"
    );
    let status = d.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{case:?}: berth did not die at the failpoint ({status}):\n{}",
        d.log()
    );
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("failpoint reached") && l.contains(case.failpoint)),
        "{case:?}: the log does not show the failpoint:\n{log}"
    );

    // A group snapshot dies with its members frozen: a write must block until the restart.
    let blocked = (case.failpoint == "group-snapshot:while-frozen").then(|| {
        let w = spawn_write(d.target_path("src").join("while-frozen"), 5, WRITE_LEN);
        assert!(
            w.recv_timeout(Duration::from_millis(500)).is_err(),
            "{case:?}: the filesystem was not frozen at the failpoint"
        );
        w
    });

    d.restart(None).await;

    if let Some(w) = blocked {
        assert!(
            w.recv_timeout(WRITE_WITHIN).is_ok(),
            "{case:?}: a write to a member of the crashed group snapshot still blocks after restart:\n{}",
            d.log()
        );
    }
    check_src_usable(&d, &fx, &case).await;
    if matches!(case.op, Op::GroupSnapshot | Op::DeleteGroup) {
        let t = d.target_path("other");
        assert!(
            is_mounted(&t),
            "{case:?}: other volume unmounted by reconcile"
        );
        assert!(
            write_within(t.join("after-crash"), 6, WRITE_LEN, WRITE_WITHIN),
            "{case:?}: the other member of the group is still frozen"
        );
    }

    match case.then {
        Then::Retry => {
            let done = issue(&d, &fx, case.op).await.unwrap_or_else(|e| {
                panic!("{case:?}: retry after restart failed: {e:?}\n{}", d.log())
            });
            verify(&d, &mut fx, case.op, done).await;
            // The retry's answer is idempotent: asking once more gives the same result.
            if !matches!(case.op, Op::DeleteVolume | Op::DeleteSnapshot | Op::Unstage) {
                issue(&d, &fx, case.op)
                    .await
                    .unwrap_or_else(|e| panic!("{case:?}: second retry failed: {e:?}"));
            }
        }
        Then::Undo => undo(&d, &mut fx, case.op).await,
    }

    teardown(&d, &mut fx).await;
}

/// Preconditions, set up by a driver without failpoint.
async fn setup(d: &Driver, op: Op) -> Fixture {
    let cap = mount_cap("ext4");
    let src = create(d, "pvc-src", &cap, VOL, None).await;
    let t = stage_and_publish(d, &src, &cap, "src").await;
    write_pattern(&t.join("data"), SRC_SEED, DATA);
    let mut fx = Fixture {
        cap,
        src: src.clone(),
        src_seed: SRC_SEED,
        other: None,
        snap: None,
        mounts: vec![(src, "src".into())],
        groups: Vec::new(),
        group: None,
    };
    match op {
        Op::CreateVolume(Source::Snapshot) | Op::DeleteSnapshot => {
            fx.snap = Some(
                create_snapshot(&d.controller().await, "snap-base", &fx.src)
                    .await
                    .snapshot_id,
            );
        }
        Op::CreateVolume(_) | Op::CreateSnapshot => {}
        Op::ExpandVolume { staged: false } => {
            fx.other = Some(create(d, "pvc-other", &fx.cap, VOL, None).await);
            fx.mounts.push((fx.other().to_string(), "other".into()));
        }
        Op::ExpandVolume { staged: true } => {
            let xfs = mount_cap("xfs");
            let other = create(d, "pvc-other", &xfs, XFS_VOL, None).await;
            let t = stage_and_publish(d, &other, &xfs, "other").await;
            write_pattern(&t.join("data"), OTHER_SEED, DATA);
            fx.mounts.push((other.clone(), "other".into()));
            fx.other = Some(other);
        }
        Op::DeleteVolume | Op::Stage { blank: true } => {
            fx.other = Some(create(d, "pvc-other", &fx.cap, VOL, None).await);
        }
        Op::Stage { blank: false }
        | Op::Unstage
        | Op::Publish
        | Op::GroupSnapshot
        | Op::DeleteGroup => {
            let other = create(d, "pvc-other", &fx.cap, VOL, None).await;
            let t = stage_and_publish(d, &other, &fx.cap, "other").await;
            write_pattern(&t.join("data"), OTHER_SEED, DATA);
            fx.mounts.push((other.clone(), "other".into()));
            fx.other = Some(other.clone());
            match op {
                Op::Stage { .. } => release(d, &other, "other").await,
                Op::Unstage | Op::Publish => unpublish(d, &other, "other").await.unwrap(),
                Op::DeleteGroup => {
                    let g =
                        create_group_snapshot(&d.group().await, "grp", &[&fx.src, &other]).await;
                    let members = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
                    fx.group = Some((g.group_snapshot_id, members));
                }
                _ => {}
            }
        }
    }
    if matches!(op, Op::Stage { blank: true }) {
        fx.mounts.push((fx.other().to_string(), "other".into()));
    }
    fx
}

/// The operation under test, as the CO sends it (the same request every time).
async fn issue(d: &Driver, fx: &Fixture, op: Op) -> Result<Done, Status> {
    let mut ctl = d.controller().await;
    Ok(match op {
        Op::CreateVolume(source) => {
            let req = create_req("pvc-new", VOL, fx.cap.clone());
            let req = match source {
                Source::Blank => req,
                Source::Snapshot => from_snapshot(req, fx.snap.as_deref().unwrap()),
                Source::Volume => from_volume(req, &fx.src),
            };
            Done::Volume(ctl.create_volume(req).await?.into_inner().volume.unwrap())
        }
        Op::DeleteVolume => {
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: fx.other().to_string(),
                ..Default::default()
            })
            .await?;
            Done::Nothing
        }
        Op::ExpandVolume { staged } => Done::Expanded(
            ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: fx.other().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: if staged { EXPANDED } else { GROWN },
                    limit_bytes: 0,
                }),
                volume_capability: Some(if staged {
                    mount_cap("xfs")
                } else {
                    fx.cap.clone()
                }),
                ..Default::default()
            })
            .await?
            .into_inner()
            .capacity_bytes,
        ),
        Op::CreateSnapshot => Done::Snapshot(
            ctl.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: fx.src.clone(),
                name: "snap-new".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .snapshot
            .unwrap(),
        ),
        Op::DeleteSnapshot => {
            ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: fx.snap.clone().unwrap(),
                ..Default::default()
            })
            .await?;
            Done::Nothing
        }
        Op::Stage { .. } => {
            d.node()
                .await
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: fx.other().to_string(),
                    staging_target_path: d.path("other/staging").to_string_lossy().into(),
                    volume_capability: Some(fx.cap.clone()),
                    ..Default::default()
                })
                .await?;
            Done::Nothing
        }
        Op::Unstage => {
            d.node()
                .await
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: fx.other().to_string(),
                    staging_target_path: d.path("other/staging").to_string_lossy().into(),
                })
                .await?;
            Done::Nothing
        }
        Op::Publish => {
            d.node()
                .await
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: fx.other().to_string(),
                    staging_target_path: d.path("other/staging").to_string_lossy().into(),
                    target_path: d.path("other/target").to_string_lossy().into(),
                    volume_capability: Some(fx.cap.clone()),
                    readonly: false,
                    ..Default::default()
                })
                .await?;
            Done::Nothing
        }
        Op::DeleteGroup => {
            let (id, members) = fx.group.clone().unwrap();
            d.group()
                .await
                .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: id,
                    snapshot_ids: members,
                    ..Default::default()
                })
                .await?;
            Done::Nothing
        }
        Op::GroupSnapshot => Done::Group(
            d.group()
                .await
                .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                    name: "grp".into(),
                    source_volume_ids: vec![fx.src.clone(), fx.other().to_string()],
                    ..Default::default()
                })
                .await?
                .into_inner()
                .group_snapshot
                .unwrap(),
        ),
    })
}

/// The retried operation did what it says, and nothing acknowledged before was lost.
async fn verify(d: &Driver, fx: &mut Fixture, op: Op, done: Done) {
    let mut ctl = d.controller().await;
    match (op, done) {
        (Op::CreateVolume(source), Done::Volume(v)) => {
            assert_eq!(v.volume_id, VolumeId::for_name("pvc-new").to_string());
            assert_eq!(v.capacity_bytes, VOL);
            assert_eq!(
                list_volume_ids(&d.controller().await)
                    .await
                    .iter()
                    .filter(|id| **id == v.volume_id)
                    .count(),
                1,
                "the retried volume is listed once"
            );
            let t = stage_and_publish(d, &v.volume_id, &fx.cap, "new").await;
            fx.mounts.push((v.volume_id.clone(), "new".into()));
            match source {
                Source::Blank => {
                    write_pattern(&t.join("data"), 3, DATA);
                    assert_eq!(std::fs::read(t.join("data")).unwrap(), pattern(3, DATA));
                }
                Source::Snapshot | Source::Volume => assert_eq!(
                    std::fs::read(t.join("data")).unwrap(),
                    pattern(SRC_SEED, DATA),
                    "the {source:?} copy holds the source's bytes"
                ),
            }
        }
        (Op::DeleteVolume, Done::Nothing) => {
            let other = fx.other().to_string();
            assert!(
                !list_volume_ids(&d.controller().await)
                    .await
                    .contains(&other)
            );
            let r = ctl
                .controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: other.clone(),
                })
                .await;
            assert_eq!(code(r), Code::NotFound);
            assert!(
                !d.pool_files()
                    .iter()
                    .any(|p| p.to_string_lossy().contains(&other)),
                "files of the deleted volume remain: {:?}",
                d.pool_files()
            );
        }
        (Op::ExpandVolume { staged: false }, Done::Expanded(bytes)) => {
            assert_eq!(bytes, GROWN);
            let other = fx.other().to_string();
            assert_eq!(capacity_of(d, &other).await, GROWN);
            // First stage formats the whole, grown device.
            let t = stage_and_publish(d, &other, &fx.cap, "other").await;
            let total = fs_total_bytes(&t) as i64;
            assert!(
                total > VOL && total <= GROWN,
                "filesystem of {total} bytes on a volume grown to {GROWN}"
            );
            write_pattern(&t.join("data"), 9, DATA);
            assert_eq!(std::fs::read(t.join("data")).unwrap(), pattern(9, DATA));
        }
        (Op::ExpandVolume { staged: true }, Done::Expanded(bytes)) => {
            assert_eq!(bytes, EXPANDED);
            let other = fx.other().to_string();
            let v = ctl
                .controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: other.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap();
            assert_eq!(v.capacity_bytes, EXPANDED, "the record has the new size");
            let target = d.target_path("other");
            let grown = d
                .node()
                .await
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: other,
                    volume_path: target.to_string_lossy().into(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: EXPANDED,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .expect("node expand")
                .into_inner()
                .capacity_bytes;
            assert_eq!(grown, EXPANDED);
            let total = fs_total_bytes(&target) as i64;
            assert!(
                total > (XFS_VOL + EXPANDED) / 2,
                "filesystem grew to {total} bytes, expected about {EXPANDED}"
            );
            assert_eq!(
                std::fs::read(target.join("data")).unwrap(),
                pattern(OTHER_SEED, DATA),
                "the expanded volume keeps its data"
            );
            assert!(write_within(
                target.join("grown"),
                8,
                WRITE_LEN,
                WRITE_WITHIN
            ));
        }
        (Op::CreateSnapshot, Done::Snapshot(s)) => {
            assert_eq!(s.snapshot_id, SnapshotId::for_name("snap-new").to_string());
            assert_eq!(s.source_volume_id, fx.src);
            assert!(s.ready_to_use);
            assert_eq!(s.size_bytes, VOL);
            assert_eq!(
                list_snapshot_ids(&d.controller().await)
                    .await
                    .iter()
                    .filter(|id| **id == s.snapshot_id)
                    .count(),
                1
            );
            // Change the source after the cut: the restore must hold the old bytes.
            fx.src_seed = 4;
            write_pattern(&d.target_path("src").join("data"), fx.src_seed, DATA);
            let r = create(d, "pvc-restore", &fx.cap, VOL, Some(&s.snapshot_id)).await;
            let t = stage_and_publish(d, &r, &fx.cap, "restore").await;
            fx.mounts.push((r, "restore".into()));
            assert_eq!(
                std::fs::read(t.join("data")).unwrap(),
                pattern(SRC_SEED, DATA),
                "restore of the retried snapshot holds the bytes of the cut"
            );
        }
        (Op::DeleteSnapshot, Done::Nothing) => {
            let snap = fx.snap.take().unwrap();
            assert!(
                !list_snapshot_ids(&d.controller().await)
                    .await
                    .contains(&snap)
            );
            let r = ctl
                .get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: snap.clone(),
                    ..Default::default()
                })
                .await;
            assert_eq!(code(r), Code::NotFound);
            assert!(
                !d.pool_files()
                    .iter()
                    .any(|p| p.to_string_lossy().contains(&snap)),
                "files of the deleted snapshot remain: {:?}",
                d.pool_files()
            );
        }
        (Op::Stage { blank }, Done::Nothing) => {
            let other = fx.other().to_string();
            assert!(is_mounted(&d.path("other/staging")), "staging is mounted");
            assert_eq!(
                loop_devices_of(d, &other).len(),
                1,
                "one loop device, none leaked"
            );
            let t = publish(d, &other, &fx.cap, "other").await;
            if blank {
                write_pattern(&t.join("data"), 5, DATA);
                assert_eq!(std::fs::read(t.join("data")).unwrap(), pattern(5, DATA));
            } else {
                assert_eq!(
                    std::fs::read(t.join("data")).unwrap(),
                    pattern(OTHER_SEED, DATA),
                    "the restaged volume keeps its data (it was not formatted again)"
                );
            }
        }
        (Op::Unstage, Done::Nothing) => {
            let other = fx.other().to_string();
            assert!(!is_mounted(&d.path("other/staging")));
            assert_eq!(loop_devices_of(d, &other), Vec::<String>::new());
            // Staged again, the data is still there.
            let t = stage_and_publish(d, &other, &fx.cap, "other").await;
            assert_eq!(
                std::fs::read(t.join("data")).unwrap(),
                pattern(OTHER_SEED, DATA)
            );
        }
        (Op::Publish, Done::Nothing) => {
            let t = d.target_path("other");
            assert!(is_mounted(&t));
            assert_eq!(
                std::fs::read(t.join("data")).unwrap(),
                pattern(OTHER_SEED, DATA)
            );
            assert!(write_within(t.join("new"), 7, WRITE_LEN, WRITE_WITHIN));
        }
        (Op::GroupSnapshot, Done::Group(g)) => {
            assert_eq!(
                g.group_snapshot_id,
                GroupSnapshotId::for_name("grp").to_string()
            );
            assert!(g.ready_to_use);
            assert_eq!(g.snapshots.len(), 2);
            let members: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
            fx.groups
                .push((g.group_snapshot_id.clone(), members.clone()));
            let got = d
                .group()
                .await
                .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                    group_snapshot_id: g.group_snapshot_id.clone(),
                    snapshot_ids: members,
                    ..Default::default()
                })
                .await
                .expect("get group")
                .into_inner()
                .group_snapshot
                .unwrap();
            assert_eq!(got.snapshots.len(), 2);
            for (i, s) in g.snapshots.iter().enumerate() {
                assert!(s.ready_to_use);
                let (seed, after) = if s.source_volume_id == fx.src {
                    (SRC_SEED, 5)
                } else {
                    assert_eq!(s.source_volume_id, fx.other());
                    (OTHER_SEED, 6)
                };
                let name = format!("g{i}");
                let r = create(
                    d,
                    &format!("pvc-{name}"),
                    &fx.cap,
                    VOL,
                    Some(&s.snapshot_id),
                )
                .await;
                let t = stage_and_publish(d, &r, &fx.cap, &name).await;
                fx.mounts.push((r, name));
                assert_eq!(std::fs::read(t.join("data")).unwrap(), pattern(seed, DATA));
                assert_eq!(
                    std::fs::read(t.join("after-crash")).unwrap(),
                    pattern(after, WRITE_LEN),
                    "the retried cut holds what was written after the restart"
                );
            }
        }
        (Op::DeleteGroup, Done::Nothing) => {
            let (id, members) = fx.group.clone().unwrap();
            let r = d
                .group()
                .await
                .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                    group_snapshot_id: id.clone(),
                    snapshot_ids: members.clone(),
                    ..Default::default()
                })
                .await;
            assert_eq!(code(r), Code::NotFound);
            let files = d.pool_files();
            for x in members.iter().chain([&id]) {
                assert!(
                    !files
                        .iter()
                        .any(|p| p.to_string_lossy().contains(x.as_str())),
                    "files of {x} remain: {files:?}"
                );
            }
        }
        (op, done) => panic!("{op:?} answered {done:?}"),
    }
}

/// Instead of retrying, the CO gives up on what it was creating.
async fn undo(d: &Driver, fx: &mut Fixture, op: Op) {
    let mut ctl = d.controller().await;
    match op {
        Op::CreateVolume(_) => {
            let id = VolumeId::for_name("pvc-new").to_string();
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("delete the half-created volume");
            assert!(!list_volume_ids(&d.controller().await).await.contains(&id));
        }
        Op::CreateSnapshot => {
            let id = SnapshotId::for_name("snap-new").to_string();
            ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("delete the half-created snapshot");
            assert!(!list_snapshot_ids(&d.controller().await).await.contains(&id));
        }
        Op::GroupSnapshot => {
            // The CO never got the ids; berth derives them from the names (members are
            // named "<group name>/<volume id>"), as a CO retrying with them would find.
            let id = GroupSnapshotId::for_name("grp").to_string();
            let members = [fx.src.as_str(), fx.other()]
                .map(|v| SnapshotId::for_name(&format!("grp/{v}")).to_string())
                .to_vec();
            d.group()
                .await
                .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: id.clone(),
                    snapshot_ids: members.clone(),
                    ..Default::default()
                })
                .await
                .expect("delete the half-created group snapshot");
            let r = d
                .group()
                .await
                .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                    group_snapshot_id: id,
                    snapshot_ids: members,
                    ..Default::default()
                })
                .await;
            assert_eq!(code(r), Code::NotFound);
            assert_eq!(
                list_snapshot_ids(&d.controller().await).await,
                Vec::<String>::new()
            );
        }
        Op::Stage { .. } => {
            let other = fx.other().to_string();
            d.node()
                .await
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: other.clone(),
                    staging_target_path: d.path("other/staging").to_string_lossy().into(),
                })
                .await
                .expect("unstage the half-staged volume");
            assert!(!is_mounted(&d.path("other/staging")));
            assert_eq!(loop_devices_of(d, &other), Vec::<String>::new());
        }
        Op::Publish => {
            let other = fx.other().to_string();
            unpublish(d, &other, "other").await.expect("unpublish");
            assert!(!is_mounted(&d.target_path("other")));
        }
        Op::ExpandVolume { staged: false } => {
            // The CO gives up the resize (Kubernetes lets a user lower a failed request):
            // the volume must stay the size it had, everywhere.
            let other = fx.other().to_string();
            assert_eq!(capacity_of(d, &other).await, VOL);
            let t = stage_and_publish(d, &other, &fx.cap, "other").await;
            let total = fs_total_bytes(&t) as i64;
            assert!(
                total <= VOL,
                "a {VOL}-byte volume holds a filesystem of {total} bytes: the unacknowledged \
                 growth of the crashed expansion leaked into it"
            );
            write_pattern(&t.join("data"), 9, DATA);
            // A snapshot restores into a volume of the recorded size, so everything in the
            // filesystem must fit into it.
            let snap = create_snapshot(&d.controller().await, "snap-shrunk", &other)
                .await
                .snapshot_id;
            let r = create(d, "pvc-from-shrunk", &fx.cap, VOL, Some(&snap)).await;
            let t2 = stage_and_publish(d, &r, &fx.cap, "from-shrunk").await;
            fx.mounts.push((r, "from-shrunk".into()));
            assert_eq!(std::fs::read(t2.join("data")).unwrap(), pattern(9, DATA));
        }
        op => panic!("{op:?} creates nothing to undo"),
    }
}

/// Unpublishes, unstages and deletes everything, then checks nothing is left.
async fn teardown(d: &Driver, fx: &mut Fixture) {
    // Nothing acknowledged was lost on the way.
    assert_eq!(
        std::fs::read(d.target_path("src").join("data")).unwrap(),
        pattern(fx.src_seed, DATA),
        "the source volume's data survived"
    );
    for (id, name) in fx.mounts.drain(..) {
        release(d, &id, &name).await;
    }
    let mut group = d.group().await;
    for (g, members) in fx.groups.drain(..) {
        group
            .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: g,
                snapshot_ids: members,
                ..Default::default()
            })
            .await
            .expect("delete group snapshot");
    }
    let mut ctl = d.controller().await;
    for s in list_snapshot_ids(&d.controller().await).await {
        ctl.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: s,
            ..Default::default()
        })
        .await
        .expect("delete snapshot");
    }
    for v in list_volume_ids(&d.controller().await).await {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v,
            ..Default::default()
        })
        .await
        .expect("delete volume");
    }
    assert_eq!(
        list_volume_ids(&d.controller().await).await,
        Vec::<String>::new()
    );
    assert_eq!(
        list_snapshot_ids(&d.controller().await).await,
        Vec::<String>::new()
    );
    d.assert_clean();
}

/// After any crash, the volume that was staged and published before it is still mounted,
/// holds its data and takes writes (reconcile must not tear down or leave frozen a stage).
async fn check_src_usable(d: &Driver, fx: &Fixture, case: &Case) {
    let t = d.target_path("src");
    assert!(
        is_mounted(&t),
        "{case:?}: published volume unmounted by the restart"
    );
    assert!(
        is_mounted(&d.path("src/staging")),
        "{case:?}: staging unmounted by the restart"
    );
    assert_eq!(
        loop_devices_of(d, &fx.src).len(),
        1,
        "{case:?}: its loop device is kept"
    );
    assert_eq!(
        std::fs::read(t.join("data")).unwrap(),
        pattern(fx.src_seed, DATA),
        "{case:?}: data written before the crash survives"
    );
    assert!(
        write_within(t.join("after-crash"), 5, WRITE_LEN, WRITE_WITHIN),
        "{case:?}: writes to the published volume block after the restart"
    );
    let stats = d
        .node()
        .await
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: fx.src.clone(),
            volume_path: t.to_string_lossy().into(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(
        !cond.abnormal,
        "{case:?}: volume abnormal after restart: {}",
        cond.message
    );
}

// ---- kill -9 while idle ------------------------------------------------------------------

/// A plain kill -9 of an idle driver loses nothing: every volume, snapshot and group snapshot
/// is still listed, and the published volume is still mounted and usable.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_idle_keeps_everything() {
    let mut d = Driver::start().await;
    let mut fx = setup(&d, Op::GroupSnapshot).await;
    let snap = create_snapshot(&d.controller().await, "snap-idle", &fx.src)
        .await
        .snapshot_id;
    let g = create_group_snapshot(&d.group().await, "grp-idle", &[&fx.src, fx.other()]).await;
    let members: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    fx.groups
        .push((g.group_snapshot_id.clone(), members.clone()));
    let block = create(&d, "pvc-block", &block_cap(), VOL, None).await;
    let vols = list_volume_ids(&d.controller().await).await;
    let snaps = list_snapshot_ids(&d.controller().await).await;
    assert_eq!(vols.len(), 3);
    assert_eq!(snaps.len(), 3);
    assert!(snaps.contains(&snap));

    for round in 0..2 {
        d.kill9();
        if round == 0 {
            // What a kill -9 inside a record write leaves (fsutil::write_atomic's temp
            // file beside the record, the record itself untouched): reconcile removes it.
            let berth = d.pool_root().join("berth");
            for (sub, id) in [
                ("volumes", &block),
                ("snapshots", &snap),
                ("groups", &g.group_snapshot_id),
            ] {
                std::fs::write(
                    berth.join(sub).join(format!(".{id}.json.tmp")),
                    b"{\"id\": \"",
                )
                .unwrap();
            }
        }
        d.restart(None).await;
        assert_eq!(list_volume_ids(&d.controller().await).await, vols);
        assert_eq!(list_snapshot_ids(&d.controller().await).await, snaps);
        let got = d
            .group()
            .await
            .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
                group_snapshot_id: g.group_snapshot_id.clone(),
                snapshot_ids: members.clone(),
                ..Default::default()
            })
            .await
            .expect("group snapshot survives kill -9")
            .into_inner()
            .group_snapshot
            .unwrap();
        assert_eq!(got.snapshots.len(), 2);
        let case = Case {
            failpoint: "",
            op: Op::GroupSnapshot,
            then: Then::Retry,
        };
        check_src_usable(&d, &fx, &case).await;
        assert!(is_mounted(&d.target_path("other")));
    }
    assert!(
        list_volume_ids(&d.controller().await)
            .await
            .contains(&block)
    );
    teardown(&d, &mut fx).await;
}

/// A crash while a group snapshot holds its members frozen, then a start-up whose pool
/// repair fails (here: an unreadable record): the node's repair runs first, so the
/// filesystems are thawed even though the driver cannot start.
#[tokio::test(flavor = "multi_thread")]
async fn corrupt_record_neither_blocks_start_nor_keeps_members_frozen() {
    let mut d = Driver::start().await;
    let mut fx = setup(&d, Op::GroupSnapshot).await;
    d.restart(Some("group-snapshot:while-frozen")).await;
    assert!(issue(&d, &fx, Op::GroupSnapshot).await.is_err());
    d.wait_exit(Duration::from_secs(60)).await;
    let blocked = spawn_write(d.target_path("src").join("while-frozen"), 5, WRITE_LEN);
    assert!(
        blocked.recv_timeout(Duration::from_millis(500)).is_err(),
        "the filesystem was not frozen at the failpoint"
    );

    // Damage from outside (a disk error, a hand edit): one record no longer parses.
    let corrupt = VolumeId::for_name("pvc-corrupt");
    let bad = d
        .pool_root()
        .join("berth/volumes")
        .join(format!("{corrupt}.json"));
    std::fs::write(&bad, b"{ not json").unwrap();
    d.restart(None).await;
    assert!(
        blocked.recv_timeout(WRITE_WITHIN).is_ok(),
        "the restarted node left its frozen filesystems frozen:\n{}",
        d.log()
    );
    let mut ctl = d.controller().await;
    let listed = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("one bad record does not take the other volumes down")
        .into_inner();
    assert!(
        listed
            .entries
            .iter()
            .any(|e| e.volume.as_ref().unwrap().volume_id == fx.src)
    );
    let got = ctl
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: corrupt.to_string(),
        })
        .await;
    assert_eq!(
        code(got),
        tonic::Code::Internal,
        "the damaged record itself is reported"
    );
    assert!(d.log().contains("skipping unreadable record"));

    std::fs::remove_file(&bad).unwrap();
    d.restart(None).await;
    check_src_usable(
        &d,
        &fx,
        &Case {
            failpoint: "group-snapshot:while-frozen",
            op: Op::GroupSnapshot,
            then: Then::Retry,
        },
    )
    .await;
    teardown(&d, &mut fx).await;
}

// ---- helpers -------------------------------------------------------------------------------

const WRITE_LEN: usize = 64 << 10;

async fn capacity_of(d: &Driver, volume_id: &str) -> i64 {
    get_volume(&d.controller().await, volume_id)
        .await
        .volume
        .expect("ControllerGetVolumeResponse.volume")
        .capacity_bytes
}

/// Loop devices backed by this volume's image.
fn loop_devices_of(d: &Driver, volume_id: &str) -> Vec<String> {
    let image = d.volume_image(volume_id);
    let out = std::process::Command::new("losetup")
        .args(["--list", "--noheadings", "-O", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(&*image.to_string_lossy()))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

async fn create(
    d: &Driver,
    name: &str,
    cap: &csi::VolumeCapability,
    bytes: i64,
    snapshot: Option<&str>,
) -> String {
    let mut req = create_req(name, bytes, cap.clone());
    if let Some(s) = snapshot {
        req = from_snapshot(req, s);
    }
    d.controller()
        .await
        .create_volume(req)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e:?}"))
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn unpublish(d: &Driver, volume_id: &str, name: &str) -> Result<(), Status> {
    d.node()
        .await
        .node_unpublish_volume(unpublish_req(volume_id, &d.target_path(name)))
        .await
        .map(drop)
}

/// Unpublishes and unstages like the kubelet: an unmount that fails because the mount is
/// busy is retried. A file closed a moment ago can still be held by a child another test
/// thread is forking (the fd table is copied until exec), which makes umount say EBUSY.
async fn release(d: &Driver, volume_id: &str, name: &str) {
    let staging = d.staging_path(name);
    let mut node = d.node().await;
    for attempt in 1.. {
        let r = match unpublish(d, volume_id, name).await {
            Ok(()) => node
                .node_unstage_volume(unstage_req(volume_id, &staging))
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => return,
            Err(e) if attempt < 10 && e.message().contains("busy") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("unpublish/unstage {name}: {e:?}"),
        }
    }
}
