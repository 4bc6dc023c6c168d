//! The contract every placement store keeps (`berth::placement::PlacementStore`), run
//! against each store by its own test: the file store on a real disk (tests/placement.rs)
//! and BerthVolumes on a real API server (tests/kube.rs).

use std::sync::Arc;

use berth::{
    error::Error,
    placement::{
        Handoff, PlacementPhase, PlacementStore, ReplicaPlacement, SnapshotPlacement,
        VolumePlacement, update,
    },
    storage::{SnapshotId, VolumeId},
};

pub fn record(name: &str, primary: &str) -> VolumePlacement {
    VolumePlacement {
        volume_id: VolumeId::for_name(name).to_string(),
        name: name.into(),
        phase: PlacementPhase::Ready,
        primary: primary.into(),
        epoch: 1,
        capacity_bytes: 1 << 30,
        ..Default::default()
    }
}

/// The contract every store keeps, run against each of them.
pub async fn contract(store: &dyn PlacementStore) {
    let a = record("pvc-a", "node-a");
    let id = a.id().unwrap();
    assert_eq!(store.get(&id).await.unwrap(), None);
    let v1 = store.create(&a).await.unwrap();
    assert_eq!(v1.record, a);
    let e = store.create(&a).await.unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "second create: {e}");

    let mut moved = a.clone();
    moved.primary = "node-b".into();
    moved.epoch = 2;
    let v2 = store.replace(&moved, &v1.version).await.unwrap();
    assert_ne!(v2.version, v1.version);
    assert_eq!(store.get(&id).await.unwrap().unwrap(), v2);

    // A writer that read v1 lost: the owner it decided from is no longer current.
    let mut stale = a.clone();
    stale.primary = "node-c".into();
    stale.epoch = 2;
    let e = store.replace(&stale, &v1.version).await.unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "stale replace: {e}");
    let e = store.delete(&id, &v1.version).await.unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "stale delete: {e}");
    assert_eq!(
        store.get(&id).await.unwrap().unwrap().record.primary,
        "node-b"
    );

    // Paging walks every record once, in id order.
    let mut ids = vec![id.to_string()];
    for i in 0..4 {
        let r = record(&format!("pvc-{i}"), "node-a");
        ids.push(r.volume_id.clone());
        store.create(&r).await.unwrap();
    }
    ids.sort();
    let (mut seen, mut start) = (Vec::new(), None::<String>);
    loop {
        let page = store.list(start.as_deref(), 2).await.unwrap();
        assert!(page.records.len() <= 2);
        seen.extend(page.records.into_iter().map(|v| v.record.volume_id));
        match page.next {
            Some(n) => start = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    store.delete(&id, &v2.version).await.unwrap();
    assert_eq!(store.get(&id).await.unwrap(), None);
    store.delete(&id, &v2.version).await.unwrap();

    // A token the store never issued is ABORTED, as CSI's listings answer one.
    let e = store.list(Some("not a token"), 2).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e}");

    // Every field the controller writes survives the store unchanged (for BerthVolume: the
    // CRD's schema accepts all of it).
    let full = full_record("pvc-full");
    let v = store.create(&full).await.unwrap();
    assert_eq!(store.get(&full.id().unwrap()).await.unwrap().unwrap(), v);
    assert_eq!(v.record, full);
}

/// A record with every field set, as the controller writes them.
pub fn full_record(name: &str) -> VolumePlacement {
    VolumePlacement {
        phase: PlacementPhase::Deleted,
        handoff: Some(Handoff {
            to: "node-c".into(),
            epoch: 3,
        }),
        replicas: vec![ReplicaPlacement {
            node: "node-b".into(),
            snapshot: "ship-0123".into(),
            snapshot_time: "2026-12-04T15:00:00Z".into(),
        }],
        parameters: [("replicas".to_string(), "2".to_string())].into(),
        claim: "db/data-pg-0".into(),
        snapshots: vec![SnapshotPlacement {
            snapshot_id: SnapshotId::for_name("snap").to_string(),
            node: "node-a".into(),
            size_bytes: 1 << 30,
            created_unix_nanos: 1_764_860_400_000_000_000,
            group_snapshot_id: "group-x".into(),
        }],
        ..record(name, "node-a")
    }
}

/// `writers` competing read-modify-write loops, each raising the epoch `rounds` times
/// through [`update`]: with a true compare-and-swap no raise is lost.
pub async fn no_lost_update(stores: Vec<Arc<dyn PlacementStore>>, rounds: u64) {
    let r = record("pvc-race", "node-a");
    let id = r.id().unwrap();
    stores[0].create(&r).await.unwrap();
    let tasks = stores.iter().cloned().map(|s| {
        let id = id.clone();
        tokio::spawn(async move {
            for _ in 0..rounds {
                update(s.as_ref(), &id, |cur| {
                    let mut next = cur.clone();
                    next.epoch += 1;
                    Ok(next)
                })
                .await
                .unwrap();
            }
        })
    });
    for t in futures::future::join_all(tasks).await {
        t.unwrap();
    }
    let end = stores[0].get(&id).await.unwrap().unwrap().record.epoch;
    assert_eq!(end, 1 + rounds * stores.len() as u64, "an update was lost");
}
