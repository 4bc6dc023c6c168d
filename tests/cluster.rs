//! A cluster on one machine: a controller and three node processes, each with its own pool,
//! socket and agent port. Volumes move between nodes when published elsewhere, replicate,
//! restore from snapshots held on other nodes, and survive kill -9 of any party mid-way.

mod common;

use std::{
    io::{Read, Seek, SeekFrom, Write},
    path::PathBuf,
};

use berth::proto::agent::v1 as pb;
use common::{cluster::TestCluster, *};

const VOL: i64 = 512 * MIB;

fn ctl_publish(volume_id: &str, node: &str) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node.into(),
        volume_capability: Some(block_cap()),
        readonly: false,
        ..Default::default()
    }
}

/// Publishes a block volume on node `i` as the CO would; returns the device path.
async fn attach(c: &TestCluster, i: usize, vol: &str) -> PathBuf {
    let node = c.nodes[i].id.clone();
    c.ctl()
        .await
        .controller_publish_volume(ctl_publish(vol, &node))
        .await
        .unwrap_or_else(|e| panic!("publish on {node}: {e:?}\n{}", c.logs()));
    let staging = c.nodes[i].path(&format!("{vol}/staging"));
    let target = c.nodes[i].path(&format!("{vol}/target"));
    let mut n = c.node(i).await;
    n.node_stage_volume(stage_req(vol, &staging, block_cap()))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(vol, &staging, &target, block_cap(), false))
        .await
        .unwrap();
    target
}

async fn detach(c: &TestCluster, i: usize, vol: &str) {
    let staging = c.nodes[i].path(&format!("{vol}/staging"));
    let target = c.nodes[i].path(&format!("{vol}/target"));
    let mut n = c.node(i).await;
    n.node_unpublish_volume(unpublish_req(vol, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(vol, &staging))
        .await
        .unwrap();
    c.ctl()
        .await
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.into(),
            node_id: c.nodes[i].id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Writes `len` bytes of a seeded pattern at `offset` of the device, durably.
fn write_pattern(dev: &PathBuf, offset: u64, len: usize, seed: u8) {
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    let mut buf = vec![0u8; len];
    let mut x = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

fn device_hash(dev: &PathBuf) -> String {
    let mut f = std::fs::File::open(dev).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

async fn create_block(c: &TestCluster, name: &str, on: usize, params: &[(&str, &str)]) -> String {
    let mut req = create_req(name, VOL, block_cap());
    req.parameters = common::params(params);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: [(
                "topology.berth.csi.dev/node".to_string(),
                c.nodes[on].id.clone(),
            )]
            .into(),
        }],
    });
    let v = create_volume(&c.ctl().await, req).await;
    assert_eq!(
        v.accessible_topology[0].segments["topology.berth.csi.dev/domain"], "default",
        "cluster volumes are accessible across the domain"
    );
    v.volume_id
}

fn received(c: &pb::TransferCounters) -> u64 {
    c.received_data_bytes
}

/// Spec "ControllerPublishVolume" + issue: publishing on a node without the data moves it;
/// the data arrives bit-identical; a move back ships only what changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_moves_there_and_back_with_only_the_change_on_the_wire() {
    let c = TestCluster::start(3).await;
    let vol = create_block(&c, "pvc-move", 0, &[]).await;
    assert_eq!(c.copies(&vol).await, vec![(0, pb::Role::Primary)]);

    let dev = attach(&c, 0, &vol).await;
    write_pattern(&dev, 0, 32 << 20, 1);
    write_pattern(&dev, 200 << 20, 16 << 20, 2);
    let on_a = device_hash(&dev);

    // Still published on A: the spec's FAILED_PRECONDITION for a single-node volume.
    let err = c
        .ctl()
        .await
        .controller_publish_volume(ctl_publish(&vol, "node-b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    detach(&c, 0, &vol).await;
    let before = c.counters(1).await;
    let dev_b = attach(&c, 1, &vol).await;
    assert_eq!(device_hash(&dev_b), on_a, "bit-identical on B");
    let first = received(&c.counters(1).await) - received(&before);
    assert!(
        (48 << 20..=56 << 20).contains(&first),
        "the first move ships the written 48 MiB, not the 512 MiB volume: {first}"
    );
    let copies = c.copies(&vol).await;
    assert!(copies.contains(&(1, pb::Role::Primary)), "{copies:?}");
    assert!(
        copies.contains(&(0, pb::Role::Replica)),
        "A keeps a replica: {copies:?}"
    );
    assert_eq!(
        copies
            .iter()
            .filter(|(_, r)| *r == pb::Role::Primary)
            .count(),
        1
    );

    // Change 4 MiB on B and move back: only the change crosses.
    write_pattern(&dev_b, 100 << 20, 4 << 20, 3);
    let on_b = device_hash(&dev_b);
    detach(&c, 1, &vol).await;
    let before = c.counters(0).await;
    let dev_a = attach(&c, 0, &vol).await;
    assert_eq!(device_hash(&dev_a), on_b, "bit-identical back on A");
    let back = received(&c.counters(0).await) - received(&before);
    assert!(
        (4 << 20..=6 << 20).contains(&back),
        "moving back ships the 4 MiB change: {back}"
    );
    detach(&c, 0, &vol).await;
    c.ctl()
        .await
        .delete_volume(delete_volume_req(&vol))
        .await
        .unwrap();
    assert_eq!(c.copies(&vol).await, vec![], "every copy deleted");
}

/// The agents accept only certificates from the cluster CA: a client with another CA's
/// certificate, or none, can neither read an inventory nor pull a snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn agents_refuse_peers_without_a_cluster_certificate() {
    let c = TestCluster::start(1).await;
    let vol = create_block(&c, "pvc-secret", 0, &[]).await;
    let rogue = c.dir.path().join("rogue");
    berth::tls::generate(&rogue, &["intruder".to_string()]).unwrap();

    for (what, dir) in [
        ("another CA", Some(rogue.join("intruder"))),
        ("no certificate", None),
    ] {
        let denied = match c.agent_with(0, dir.as_deref()).await {
            Err(_) => true,
            Ok(mut a) => {
                let inv = a.inventory(pb::InventoryRequest {}).await;
                let send = a
                    .send(pb::SendRequest {
                        snapshot_id: String::new(),
                        ..Default::default()
                    })
                    .await;
                inv.is_err() && send.is_err()
            }
        };
        assert!(denied, "a peer with {what} was let in");
    }
    // The real certificate works, so the refusals above are about the certificate.
    let inv = c.inventory(0).await;
    assert!(inv.volumes.iter().any(|v| v.volume_id == vol));
}
