//! End-to-end data tests: bytes written through a published volume come back exactly from
//! snapshots, restores, clones, block devices and online expansion.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_restore_returns_the_old_bytes() {
    let d = Driver::start().await;
    let mut ctl = d.controller().await;
    let cap = mount_cap("ext4");
    let vol = ctl
        .create_volume(create_req("pvc-data", 256 * MIB, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let target = stage_and_publish(&d, &vol.volume_id, &cap, "a").await;
    write_pattern(&target.join("file"), 1, 8 << 20);

    let snap = ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    write_pattern(&target.join("file"), 2, 8 << 20);

    let restored = ctl
        .create_volume(from_snapshot(
            create_req("pvc-restored", 512 * MIB, cap.clone()),
            &snap.snapshot_id,
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        restored.capacity_bytes,
        512 * MIB,
        "a restore may be larger than its snapshot"
    );
    let t2 = stage_and_publish(&d, &restored.volume_id, &cap, "b").await;
    assert_eq!(
        std::fs::read(t2.join("file")).unwrap(),
        pattern(1, 8 << 20),
        "restore holds the snapshot's bytes"
    );
    assert_eq!(
        std::fs::read(target.join("file")).unwrap(),
        pattern(2, 8 << 20),
        "source kept its new bytes"
    );

    unpublish_and_unstage(&d, &vol.volume_id, "a").await;
    unpublish_and_unstage(&d, &restored.volume_id, "b").await;
    for id in [&vol.volume_id, &restored.volume_id] {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    d.assert_clean();
}
