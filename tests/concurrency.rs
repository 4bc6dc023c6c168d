//! Concurrency: what a CO that lost track of its in-flight calls (or a user with two
//! provisioners) can throw at the driver at once. Every call must end in a spec-valid code,
//! never INTERNAL, and the state afterwards must agree with the calls that succeeded.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use common::*;
use futures::future::BoxFuture;
use tokio::sync::Barrier;
use tonic::Code;

/// Files under `<pool>/berth/<sub>`, by name.
fn pool_dir(d: &Driver, sub: &str) -> BTreeSet<String> {
    std::fs::read_dir(d.pool_root().join("berth").join(sub))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn assert_no_tmp_files(d: &Driver) {
    assert_eq!(
        pool_dir(d, "tmp"),
        BTreeSet::new(),
        "files left in {}",
        d.pool_root().join("berth/tmp").display()
    );
}

async fn available(ctl: &mut Ctl) -> i64 {
    ctl.get_capacity(csi::GetCapacityRequest {
        volume_capabilities: vec![block_cap()],
        ..Default::default()
    })
    .await
    .expect("GetCapacity")
    .into_inner()
    .available_capacity
}

fn never_internal(what: &str, c: Code) {
    assert!(
        !matches!(c, Code::Internal | Code::Unknown | Code::Unavailable),
        "{what} failed with {c:?}: a race must end in a spec-valid code"
    );
}

// ---- one name, sixteen callers ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_creates_of_one_name_make_exactly_one_volume() {
    const CALLERS: usize = 16;
    let d = Driver::start().await;
    let mut ctl = d.controller().await;
    for (round, cap) in [mount_cap("ext4"), block_cap(), mount_cap("xfs")]
        .into_iter()
        .enumerate()
    {
        let name = format!("pvc-race-{round}");
        let size = if round == 2 { 320 * MIB } else { 64 * MIB };
        let barrier = Arc::new(Barrier::new(CALLERS));
        let mut tasks = Vec::new();
        for _ in 0..CALLERS {
            // Each caller on its own connection, as separate CO replicas would be.
            let mut c = d.controller().await;
            let b = barrier.clone();
            let req = create_req(&name, size, cap.clone());
            tasks.push(tokio::spawn(async move {
                b.wait().await;
                c.create_volume(req)
                    .await
                    .map(|r| r.into_inner().volume.expect("a volume"))
            }));
        }
        let mut ok_ids = BTreeSet::new();
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        for t in tasks {
            let r = t.await.unwrap();
            let c = r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
            *codes.entry(format!("{c:?}")).or_default() += 1;
            match r {
                Ok(v) => {
                    assert_eq!(v.capacity_bytes, size);
                    ok_ids.insert(v.volume_id);
                }
                Err(s) => assert_eq!(
                    s.code(),
                    Code::Aborted,
                    "a concurrent create of the same name may only be ABORTED: {s:?}"
                ),
            }
        }
        println!("round {round}: {codes:?}");
        assert!(
            codes.get("Ok").copied().unwrap_or(0) >= 1,
            "no call succeeded"
        );
        assert_eq!(
            ok_ids.len(),
            1,
            "successful calls disagree on the id: {ok_ids:?}"
        );
        let id = ok_ids.into_iter().next().unwrap();
        assert_eq!(list_volume_ids(&ctl).await, vec![id.clone()]);
        assert_eq!(
            pool_dir(&d, "volumes"),
            BTreeSet::from([format!("{id}.img"), format!("{id}.json")]),
            "one image and one record"
        );
        assert_no_tmp_files(&d);

        // The CO's retry, later, finds the same volume.
        let again = ctl
            .create_volume(create_req(&name, size, cap.clone()))
            .await
            .expect("retried create")
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(again.volume_id, id);
        assert_eq!(again.capacity_bytes, size);
        assert_eq!(list_volume_ids(&ctl).await, vec![id.clone()]);

        // The volume is whole: it stages and mounts (or attaches) like any other.
        let path = stage_and_publish(&d, &id, &cap, &format!("r{round}")).await;
        if matches!(
            cap.access_type,
            Some(csi::volume_capability::AccessType::Mount(_))
        ) {
            write_pattern(&path.join("f"), round as u64, 1 << 20);
            assert_eq!(
                std::fs::read(path.join("f")).unwrap(),
                pattern(round as u64, 1 << 20)
            );
        }
        unpublish_and_unstage(&d, &id, &format!("r{round}")).await;
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    d.assert_clean();
}

// ---- different operations on one volume ----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Expand,
    Snapshot,
    ControllerPublish,
    Delete,
    Stage,
    Get,
    Clone,
    Stats,
}

const OPS: [Op; 8] = [
    Op::Expand,
    Op::Snapshot,
    Op::ControllerPublish,
    Op::Delete,
    Op::Stage,
    Op::Get,
    Op::Clone,
    Op::Stats,
];

/// Codes the spec allows each call to end with when it races the others on one volume
/// (besides OK): ABORTED for "an operation is in flight", NOT_FOUND once the volume is gone,
/// FAILED_PRECONDITION for a delete of a volume that is published or attached.
fn allowed(op: Op, c: Code) -> bool {
    match op {
        Op::Delete => matches!(c, Code::Ok | Code::Aborted | Code::FailedPrecondition),
        Op::Get | Op::Stats => matches!(c, Code::Ok | Code::NotFound),
        _ => matches!(c, Code::Ok | Code::Aborted | Code::NotFound),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_operations_on_one_volume_race_safely() {
    const ROUNDS: usize = 24;
    let d = Driver::start().await;
    let mut ctl = d.controller().await;
    let mut node = d.node().await;
    let cap = mount_cap("ext4");
    let mut seen: BTreeMap<Op, BTreeMap<String, usize>> = BTreeMap::new();
    for round in 0..ROUNDS {
        let vol = ctl
            .create_volume(create_req(
                &format!("pvc-ops-{round}"),
                64 * MIB,
                cap.clone(),
            ))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let id = vol.volume_id.clone();
        let staging: PathBuf = d.path(&format!("ops-{round}/staging"));
        let snap_name = format!("snap-ops-{round}");
        let clone_name = format!("pvc-ops-clone-{round}");

        let barrier = Arc::new(Barrier::new(OPS.len()));
        let mut calls: Vec<BoxFuture<'static, (Op, Result<(), tonic::Status>)>> = Vec::new();
        for (i, op) in OPS.into_iter().enumerate() {
            // All start together in the first rounds; later rounds stagger the start a little
            // (a fixed pseudo-random 0..120 ms per call) so some calls run in sequence and the
            // checks below see many different orders, not only "the first one wins".
            let delay = if round < 4 {
                0
            } else {
                (round as u64 * 2_654_435_761 + i as u64 * 40_503) % 121
            };
            let mut c = d.controller().await;
            let mut n = d.node().await;
            let b = barrier.clone();
            let (id, cap, staging) = (id.clone(), cap.clone(), staging.clone());
            let (snap_name, clone_name) = (snap_name.clone(), clone_name.clone());
            calls.push(Box::pin(async move {
                b.wait().await;
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let r = match op {
                    Op::Expand => c
                        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                            volume_id: id,
                            capacity_range: Some(csi::CapacityRange {
                                required_bytes: 128 * MIB,
                                limit_bytes: 0,
                            }),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    Op::Snapshot => c
                        .create_snapshot(csi::CreateSnapshotRequest {
                            source_volume_id: id,
                            name: snap_name,
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    Op::ControllerPublish => c
                        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                            volume_id: id,
                            node_id: NODE_ID.into(),
                            volume_capability: Some(cap),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    Op::Delete => c
                        .delete_volume(csi::DeleteVolumeRequest {
                            volume_id: id,
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    Op::Stage => n
                        .node_stage_volume(csi::NodeStageVolumeRequest {
                            volume_id: id,
                            staging_target_path: staging.to_string_lossy().into(),
                            volume_capability: Some(cap),
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                    Op::Get => c
                        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id })
                        .await
                        .map(drop),
                    Op::Clone => c
                        .create_volume(from_volume(create_req(&clone_name, 64 * MIB, cap), &id))
                        .await
                        .map(drop),
                    Op::Stats => n
                        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                            volume_id: id,
                            volume_path: staging.to_string_lossy().into(),
                            staging_target_path: String::new(),
                        })
                        .await
                        .map(drop),
                };
                (op, r)
            }));
        }
        let results: BTreeMap<Op, Result<(), tonic::Status>> =
            futures::future::join_all(calls).await.into_iter().collect();
        let code_of = |op: Op| {
            results[&op]
                .as_ref()
                .map_or_else(|s| s.code(), |_| Code::Ok)
        };
        for (op, r) in &results {
            let c = code_of(*op);
            *seen
                .entry(*op)
                .or_default()
                .entry(format!("{c:?}"))
                .or_default() += 1;
            never_internal(&format!("round {round}: {op:?} ({r:?})"), c);
            assert!(
                allowed(*op, c),
                "round {round}: {op:?} ended with {c:?}, not a code the spec allows here: {r:?}"
            );
        }
        let ok = |op: Op| code_of(op) == Code::Ok;

        // ---- the state agrees with what succeeded ----
        let got = ctl
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await;
        let listed = list_volume_ids(&ctl).await;
        let volumes = pool_dir(&d, "volumes");
        if ok(Op::Delete) {
            assert_eq!(
                code(got),
                Code::NotFound,
                "round {round}: deleted, yet found"
            );
            assert!(!listed.contains(&id), "round {round}: deleted, yet listed");
            assert!(
                !volumes.iter().any(|f| f.starts_with(&id)),
                "round {round}: deleted, yet {volumes:?} in the pool"
            );
            assert!(
                !ok(Op::Stage) && !ok(Op::ControllerPublish),
                "round {round}: a volume in use was deleted: {results:?}"
            );
        } else {
            let got = got
                .unwrap_or_else(|s| panic!("round {round}: volume lost without a delete: {s:?}"))
                .into_inner();
            let want = if ok(Op::Expand) { 128 * MIB } else { 64 * MIB };
            assert_eq!(
                got.volume.as_ref().unwrap().capacity_bytes,
                want,
                "round {round}: capacity after {results:?}"
            );
            let status = got.status.unwrap();
            let want_nodes = if ok(Op::ControllerPublish) {
                vec![NODE_ID.to_string()]
            } else {
                vec![]
            };
            assert_eq!(status.published_node_ids, want_nodes, "round {round}");
            assert!(!status.volume_condition.unwrap().abnormal);
            assert!(listed.contains(&id));
            let image = d.pool_root().join(format!("berth/volumes/{id}.img"));
            assert_eq!(
                std::fs::metadata(&image).unwrap().len() as i64,
                want,
                "round {round}: image size"
            );
        }
        let mounted = d
            .test_mounts()
            .contains(&staging.to_string_lossy().into_owned());
        assert_eq!(
            mounted,
            ok(Op::Stage),
            "round {round}: staged is {}, mounted is {mounted}",
            ok(Op::Stage)
        );
        let snap_id = {
            let r = ctl
                .list_snapshots(csi::ListSnapshotsRequest {
                    source_volume_id: id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let snaps: Vec<_> = r.entries.into_iter().map(|e| e.snapshot.unwrap()).collect();
            assert_eq!(
                snaps.len(),
                ok(Op::Snapshot) as usize,
                "round {round}: {snaps:?}"
            );
            if let Some(s) = snaps.first() {
                assert!(s.ready_to_use);
                assert!(
                    s.size_bytes == 64 * MIB || s.size_bytes == 128 * MIB,
                    "round {round}: snapshot size {}",
                    s.size_bytes
                );
            }
            snaps.first().map(|s| s.snapshot_id.clone())
        };
        let clone_id = listed.iter().find(|v| **v != id).cloned();
        assert_eq!(
            clone_id.is_some(),
            ok(Op::Clone),
            "round {round}: clone listed {clone_id:?} vs {results:?}"
        );
        assert_no_tmp_files(&d);

        // ---- undo this round ----
        if ok(Op::Stage) {
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
            })
            .await
            .unwrap();
        }
        ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: NODE_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        for v in clone_id.iter().chain([&id]) {
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("round {round}: delete {v}: {s:?}"));
        }
        if let Some(s) = snap_id {
            ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: s,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        assert!(list_volume_ids(&ctl).await.is_empty());
    }
    println!("codes seen over {ROUNDS} rounds: {seen:#?}");
    d.assert_clean();
}

// ---- the sidecars probe at once -----------------------------------------------------------------

/// The controller pod's sidecars all call Probe at start-up, and csi-provisioner exits on a
/// failed one: concurrent probes must never fail each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_probes_never_fail_each_other() {
    const CALLERS: usize = 16;
    const ROUNDS: usize = 20;
    let d = Driver::start().await;
    let id = d.identity().await;
    for _ in 0..ROUNDS {
        let probes = (0..CALLERS).map(|_| {
            let mut id = id.clone();
            async move { id.probe(csi::ProbeRequest {}).await }
        });
        for r in futures::future::join_all(probes).await {
            let ready = r.expect("a concurrent Probe failed").into_inner().ready;
            assert_eq!(ready, Some(true));
        }
    }
    assert_no_tmp_files(&d);
}

// ---- the pool is never promised twice ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_overcommit_the_pool() {
    const CALLERS: usize = 16;
    let d = Driver::start_with(Options {
        pool_size: "2Gi",
        ..Default::default()
    })
    .await;
    let mut ctl = d.controller().await;
    let first = available(&mut ctl).await;
    assert!(first > GIB && first <= 2 * GIB, "pool capacity {first}");

    // Sizes from 64 to 320 MiB, three times the pool in all.
    let sizes: Vec<i64> = (0..CALLERS)
        .map(|i| 64 * MIB * (1 + (i as i64 * 7) % 5))
        .collect();
    let wanted: i64 = sizes.iter().sum();
    let barrier = Arc::new(Barrier::new(CALLERS));
    let mut tasks = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let mut c = d.controller().await;
        let b = barrier.clone();
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            let r = c
                .create_volume(create_req(&format!("pvc-fill-{i}"), size, block_cap()))
                .await;
            (size, r.map(|r| r.into_inner().volume.unwrap()))
        }));
    }
    let mut created = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (size, r) = t.await.unwrap();
        match r {
            Ok(v) => {
                assert_eq!(v.capacity_bytes, size);
                created.push(v);
            }
            Err(s) => {
                assert_eq!(
                    s.code(),
                    Code::ResourceExhausted,
                    "a create the pool cannot hold is RESOURCE_EXHAUSTED: {s:?}"
                );
                refused += 1;
            }
        }
    }
    let mut sum: i64 = created.iter().map(|v| v.capacity_bytes).sum();
    println!(
        "pool offered {first} bytes; {} creates asked {wanted}; {} succeeded ({sum} bytes), {refused} refused",
        CALLERS,
        created.len()
    );
    assert!(refused > 0, "the creates did not exceed the pool");
    assert!(
        sum <= first,
        "over-committed: {sum} bytes of volumes created from a pool offering {first}"
    );

    // Whatever GetCapacity offers next must fit in what it offered at first: take it all, in
    // one volume, until nothing is left.
    let mut fill = 0;
    loop {
        let avail = available(&mut ctl).await;
        println!("created {sum} bytes; GetCapacity offers {avail} more");
        assert!(
            sum + avail <= first,
            "over-committed: {sum} bytes created, and GetCapacity now offers {avail} more, \
             but the pool offered {first} in all"
        );
        if avail < MIB {
            break;
        }
        let v = ctl
            .create_volume(create_req(&format!("pvc-rest-{fill}"), avail, block_cap()))
            .await
            .unwrap_or_else(|s| panic!("GetCapacity offered {avail} bytes, the create: {s:?}"))
            .into_inner()
            .volume
            .unwrap();
        sum += v.capacity_bytes;
        created.push(v);
        fill += 1;
        assert!(fill < 8, "capacity never runs out");
    }
    let r = ctl
        .create_volume(create_req("pvc-one-more", MIB, block_cap()))
        .await;
    assert_eq!(
        code(r),
        Code::ResourceExhausted,
        "a full pool takes no more"
    );
    assert_no_tmp_files(&d);

    for v in created {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Deletes give it all back (give or take the pool filesystem's own metadata).
    let after = available(&mut ctl).await;
    assert!(
        (after - first).abs() <= 4 * MIB,
        "the pool offered {first} at first and {after} after every volume was deleted"
    );
    d.assert_clean();
}
