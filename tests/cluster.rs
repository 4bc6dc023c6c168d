//! A cluster on one machine: a controller and three node processes, each with its own pool,
//! socket and agent port. Volumes move between nodes when published elsewhere, replicate,
//! restore from snapshots held on other nodes, and survive kill -9 of any party mid-way.

mod common;

use std::{
    io::{Read, Seek, SeekFrom, Write},
    path::PathBuf,
    time::Duration,
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
    // ABORTED (a replication round of the volume is under way) is retried, as a CO does.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match c
            .ctl()
            .await
            .controller_publish_volume(ctl_publish(vol, &node))
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::Aborted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("publish on {node}: {e:?}\n{}", c.logs()),
        }
    }
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
    ctl_unpublish(c, vol, &c.nodes[i].id).await;
}

/// ControllerUnpublishVolume, retried on ABORTED (a replication round or a move of the
/// volume under way), as a CO does.
async fn ctl_unpublish(c: &TestCluster, vol: &str, node: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .ctl()
            .await
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: vol.into(),
                node_id: node.into(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => return,
            Err(e) if e.code() == tonic::Code::Aborted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("unpublish on {node}: {e:?}"),
        }
    }
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

    // Change 4 MiB on B, and 256 scattered 4 KiB blocks (a delta of many small pieces,
    // which travel batched), and move back: only the change crosses.
    write_pattern(&dev_b, 100 << 20, 4 << 20, 3);
    for k in 0..256u64 {
        write_pattern(
            &dev_b,
            (300 << 20) + k * (256 << 10),
            4096,
            (k % 200) as u8 + 20,
        );
    }
    let on_b = device_hash(&dev_b);
    detach(&c, 1, &vol).await;
    let before = c.counters(0).await;
    let dev_a = attach(&c, 0, &vol).await;
    assert_eq!(device_hash(&dev_a), on_b, "bit-identical back on A");
    let back = received(&c.counters(0).await) - received(&before);
    assert!(
        (5 << 20..=7 << 20).contains(&back),
        "moving back ships the 5 MiB change: {back}"
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
                let fence = a
                    .fence(pb::FenceRequest {
                        volume_id: vol.clone(),
                        to_node_id: "intruder".into(),
                        epoch: 99,
                        keep: vec![],
                    })
                    .await;
                inv.is_err() && send.is_err() && fence.is_err()
            }
        };
        assert!(denied, "a peer with {what} was let in");
    }
    // The real certificate works, so the refusals above are about the certificate, and
    // nothing changed: the volume is still an unfenced primary.
    assert_eq!(c.copies(&vol).await, vec![(0, pb::Role::Primary)]);
}

/// Creates a block volume on node 0 with `mib` MiB written, unpublished; returns its id and
/// the data's hash.
async fn volume_with_data(
    c: &TestCluster,
    name: &str,
    mib: usize,
    params: &[(&str, &str)],
) -> (String, String) {
    let vol = create_block(c, name, 0, params).await;
    let dev = attach(c, 0, &vol).await;
    write_pattern(&dev, 0, mib << 20, 7);
    let hash = device_hash(&dev);
    detach(c, 0, &vol).await;
    (vol, hash)
}

async fn try_publish(c: &TestCluster, i: usize, vol: &str) -> Result<(), tonic::Status> {
    c.ctl()
        .await
        .controller_publish_volume(ctl_publish(vol, &c.nodes[i].id))
        .await
        .map(|_| ())
}

/// After a fault and a retry: exactly one primary, on `i`, and the data intact there.
async fn assert_moved(c: &TestCluster, i: usize, vol: &str, hash: &str) {
    let copies = c.copies(vol).await;
    let primaries: Vec<_> = copies
        .iter()
        .filter(|(_, r)| matches!(r, pb::Role::Primary | pb::Role::Fenced))
        .collect();
    assert_eq!(
        primaries,
        vec![&(i, pb::Role::Primary)],
        "one primary: {copies:?}\n{}",
        c.logs()
    );
    let dev = attach(c, i, vol).await;
    assert_eq!(device_hash(&dev), hash, "data intact after the fault");
    detach(c, i, vol).await;
}

/// Faults on the receiving side: the target is killed after a durable checkpoint of a
/// transfer, or right after its promotion is recorded. The retried publish completes, the
/// transfer resumes instead of starting over.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_target_mid_move_resumes_on_retry() {
    let mut c = TestCluster::start(2).await;
    let (vol, hash) = volume_with_data(&c, "pvc-target", 200, &[]).await;
    c.restart_node(1, Some("receive:after-checkpoint")).await;
    let err = try_publish(&c, 1, &vol).await.unwrap_err();
    c.wait_node_exit(1, Duration::from_secs(30)).await;
    assert_ne!(err.code(), tonic::Code::Ok);
    // Before the retry: the old primary is intact (fenced, nothing published anywhere).
    c.restart_node(1, None).await;
    try_publish(&c, 1, &vol)
        .await
        .unwrap_or_else(|e| panic!("retry: {e:?}\n{}", c.logs()));
    let counters = c.counters(1).await;
    assert_eq!(counters.transfers_resumed, 1, "{counters:?}");
    assert!(
        counters.received_data_bytes < 200 << 20,
        "the retry did not start from zero: {counters:?}"
    );
    ctl_unpublish(&c, &vol, "node-b").await;
    assert_moved(&c, 1, &vol, &hash).await;

    // Killed while promoting: after the new volume record, and after the image is in place
    // but before the old copy settles.
    let mut at = 1;
    for fp in ["promote:after-record", "promote:after-volume"] {
        let to = 1 - at;
        move_through_a_crash(&mut c, to, Some(fp), &vol, &hash).await;
        at = to;
    }
}

/// Moves `vol` to node `to`; with a failpoint, node `to` first dies there on a publish
/// that must fail, and restarts. The retried publish completes, and the data is intact
/// on exactly one primary, `to`.
async fn move_through_a_crash(
    c: &mut TestCluster,
    to: usize,
    failpoint: Option<&str>,
    vol: &str,
    hash: &str,
) {
    if let Some(fp) = failpoint {
        c.restart_node(to, Some(fp)).await;
        let err = try_publish(c, to, vol).await.unwrap_err();
        assert_ne!(err.code(), tonic::Code::Ok);
        c.wait_node_exit(to, Duration::from_secs(30)).await;
        c.restart_node(to, None).await;
    }
    try_publish(c, to, vol)
        .await
        .unwrap_or_else(|e| panic!("{failpoint:?}: retry: {e:?}\n{}", c.logs()));
    ctl_unpublish(c, vol, &c.nodes[to].id).await;
    assert_moved(c, to, vol, hash).await;
}

/// A replicated volume's hand-off adopts the received delta image instead of cloning it
/// (docs/moving.md, "Promote B"). A crash at either promote failpoint in that mode leaves
/// the old primary intact or a verified new one, the retry completes, and moves back and
/// forth keep finding a common base.
#[tokio::test(flavor = "multi_thread")]
async fn an_adopting_promotion_survives_crashes_at_each_step() {
    let mut c = TestCluster::start(2).await;
    let vol = create_block(
        &c,
        "pvc-adopt",
        0,
        &[("replicas", "2"), ("replicationInterval", "1h")],
    )
    .await;
    let dev = attach(&c, 0, &vol).await;
    write_pattern(&dev, 0, 16 << 20, 4);
    // The replication loop's first round leaves node B a replica to take a delta against.
    c.wait_until("a replica on B", Duration::from_secs(30), || async {
        c.copies(&vol).await.contains(&(1, pb::Role::Replica))
    })
    .await;
    // Scattered changes since: what the hand-off ships as a delta.
    for k in 0..64u64 {
        write_pattern(
            &dev,
            (32 << 20) + k * (256 << 10),
            4096,
            (k % 100) as u8 + 30,
        );
    }
    let hash = device_hash(&dev);
    detach(&c, 0, &vol).await;

    let mut at = 0;
    for fp in [
        Some("promote:after-record"),
        Some("promote:after-volume"),
        None,
    ] {
        let to = 1 - at;
        let before = adoptions(&c, to);
        move_through_a_crash(&mut c, to, fp, &vol, &hash).await;
        assert!(
            adoptions(&c, to) > before,
            "{fp:?}: node {to} adopted the image\n{}",
            c.logs()
        );
        at = to;
    }

    // An I/O error, not a crash, after the adopted snapshot was marked for deletion: the
    // node undoes the promotion itself and keeps the snapshot, so the retry succeeds
    // without a restart (before, a Creating record made it refuse the volume until one).
    let to = 1 - at;
    let before = adoptions(&c, to);
    c.restart_node(to, Some("promote:before-ready:error")).await;
    let err = try_publish(&c, to, &vol).await.unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    assert!(
        c.nodes[to].log().contains("promotion failed; undone"),
        "{}",
        c.logs()
    );
    try_publish(&c, to, &vol)
        .await
        .unwrap_or_else(|e| panic!("retry after an undone promotion: {e:?}\n{}", c.logs()));
    ctl_unpublish(&c, &vol, &c.nodes[to].id).await;
    assert_moved(&c, to, &vol, &hash).await;
    assert!(
        adoptions(&c, to) > before,
        "the retry adopted the kept snapshot\n{}",
        c.logs()
    );
}

/// How many promotions node `node` has made by adopting the received image, from its log
/// (which spans its restarts).
fn adoptions(c: &TestCluster, node: usize) -> usize {
    c.nodes[node]
        .log()
        .matches("volume adopted the received image")
        .count()
}

/// The source is killed while it streams (the connection is cut mid-transfer): the old
/// primary stays intact and fenced, and the retry completes the move.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_source_mid_stream_leaves_it_intact_and_the_retry_completes() {
    let mut c = TestCluster::start(2).await;
    let (vol, hash) = volume_with_data(&c, "pvc-source", 200, &[]).await;
    // Slow the sender so the kill lands mid-stream.
    c.restart_node(0, Some("send:chunk:sleep=30")).await;
    let ctl = c.ctl().await;
    let (v2, b) = (vol.clone(), c.nodes[1].id.clone());
    let publish = tokio::spawn(async move {
        ctl.clone()
            .controller_publish_volume(ctl_publish(&v2, &b))
            .await
    });
    // Wait until the receiver has data in flight, then cut it off.
    c.wait_until("80 MiB received", Duration::from_secs(30), || async {
        c.counters(1).await.received_data_bytes >= 80 << 20
    })
    .await;
    c.kill_node(0);
    assert!(
        publish.await.unwrap().is_err(),
        "the move cannot finish without its source"
    );
    c.restart_node(0, None).await;
    let copies = c.copies(&vol).await;
    assert_eq!(
        copies,
        vec![(0, pb::Role::Fenced)],
        "old primary intact, fenced: {copies:?}"
    );
    try_publish(&c, 1, &vol)
        .await
        .unwrap_or_else(|e| panic!("retry: {e:?}\n{}", c.logs()));
    assert_eq!(c.counters(1).await.transfers_resumed, 1);
    ctl_unpublish(&c, &vol, "node-b").await;
    assert_moved(&c, 1, &vol, &hash).await;
}

/// The source is killed between writing its fence and cutting the final snapshot: it comes
/// back fenced, refusing publishes, and the retry cuts the snapshot and completes the move.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_source_between_fence_and_final_snapshot() {
    let mut c = TestCluster::start(2).await;
    let (vol, hash) = volume_with_data(&c, "pvc-fence", 16, &[]).await;
    c.restart_node(0, Some("fence:after-record")).await;
    assert!(try_publish(&c, 1, &vol).await.is_err());
    c.wait_node_exit(0, Duration::from_secs(30)).await;
    c.restart_node(0, None).await;
    assert_eq!(c.copies(&vol).await, vec![(0, pb::Role::Fenced)]);
    // A fenced copy is never staged, whatever the CO asks.
    let staging = c.nodes[0].path("fenced/staging");
    let err = c
        .node(0)
        .await
        .node_stage_volume(stage_req(&vol, &staging, block_cap()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    try_publish(&c, 1, &vol)
        .await
        .unwrap_or_else(|e| panic!("retry: {e:?}\n{}", c.logs()));
    ctl_unpublish(&c, &vol, "node-b").await;
    assert_moved(&c, 1, &vol, &hash).await;
}

/// The network drops the connection mid-stream while both nodes stay up: the old primary is
/// intact and fenced, and the retry resumes the transfer where it was cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_cut_mid_stream_resumes_on_retry() {
    let mut c = TestCluster::start_proxied(2, &[0]).await;
    let (vol, hash) = volume_with_data(&c, "pvc-cut", 200, &[]).await;
    c.restart_node(0, Some("send:chunk:sleep=30")).await;
    let ctl = c.ctl().await;
    let (v2, b) = (vol.clone(), c.nodes[1].id.clone());
    let publish = tokio::spawn(async move {
        ctl.clone()
            .controller_publish_volume(ctl_publish(&v2, &b))
            .await
    });
    c.wait_until("80 MiB received", Duration::from_secs(30), || async {
        c.counters(1).await.received_data_bytes >= 80 << 20
    })
    .await;
    c.proxies[0].cut();
    assert!(
        publish.await.unwrap().is_err(),
        "the cut fails this attempt"
    );
    assert_eq!(
        c.copies(&vol).await,
        vec![(0, pb::Role::Fenced)],
        "old primary intact, fenced"
    );
    try_publish(&c, 1, &vol)
        .await
        .unwrap_or_else(|e| panic!("retry: {e:?}\n{}", c.logs()));
    let counters = c.counters(1).await;
    assert_eq!(counters.transfers_resumed, 1, "{counters:?}");
    assert!(
        counters.received_data_bytes < (200 << 20) + (80 << 20),
        "the retry resumed rather than starting over: {counters:?}"
    );
    assert!(c.nodes[0].child.is_some(), "no process died");
    ctl_unpublish(&c, &vol, "node-b").await;
    assert_moved(&c, 1, &vol, &hash).await;
}

/// A hand-off that failed (the target died mid-receive) is cancelled when the CO publishes
/// the volume back where it was: the old primary is writable again at a higher epoch, and
/// its data, changed after the cancel, moves correctly later, leaving no partial behind.
#[tokio::test(flavor = "multi_thread")]
async fn publishing_back_on_the_source_cancels_a_failed_hand_off() {
    let mut c = TestCluster::start(2).await;
    let (vol, _) = volume_with_data(&c, "pvc-cancel", 100, &[]).await;
    c.restart_node(1, Some("receive:after-checkpoint")).await;
    assert!(try_publish(&c, 1, &vol).await.is_err());
    c.wait_node_exit(1, Duration::from_secs(30)).await;
    c.restart_node(1, None).await;
    assert_eq!(c.copies(&vol).await, vec![(0, pb::Role::Fenced)]);

    // Back on A: unfenced, and writable.
    let dev = attach(&c, 0, &vol).await;
    assert_eq!(c.copies(&vol).await, vec![(0, pb::Role::Primary)]);
    write_pattern(&dev, 50 << 20, 8 << 20, 42);
    let hash = device_hash(&dev);
    detach(&c, 0, &vol).await;
    let dev_b = attach(&c, 1, &vol).await;
    assert_eq!(
        device_hash(&dev_b),
        hash,
        "the change after the cancel arrived"
    );
    detach(&c, 1, &vol).await;
    let incoming = c.nodes[1].pool_root().join("berth").join("incoming");
    assert_eq!(
        std::fs::read_dir(&incoming).unwrap().count(),
        0,
        "the cancelled hand-off's partial receive is gone"
    );
}

/// While a node is down, nothing that changes copies proceeds: its copy may be the one
/// that matters. A move answers UNAVAILABLE (and moves nothing) until every node answers;
/// GetCapacity answers from the nodes that do.
#[tokio::test(flavor = "multi_thread")]
async fn no_move_while_a_node_is_silent() {
    let mut c = TestCluster::start(3).await;
    let (vol, hash) = volume_with_data(&c, "pvc-silent", 16, &[]).await;
    c.kill_node(2);
    let err = try_publish(&c, 1, &vol).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // Capacity is still known for the nodes that answer; the silent one's is not.
    let cap = |node: Option<&str>| csi::GetCapacityRequest {
        volume_capabilities: vec![block_cap()],
        accessible_topology: node.map(|n| csi::Topology {
            segments: [("topology.berth.csi.dev/node".to_string(), n.to_string())].into(),
        }),
        ..Default::default()
    };
    let ctl = c.ctl().await;
    let domain = ctl.clone().get_capacity(cap(None)).await.unwrap();
    assert!(domain.into_inner().available_capacity > 0);
    let silent = ctl
        .clone()
        .get_capacity(cap(Some("node-c")))
        .await
        .unwrap_err();
    assert_eq!(silent.code(), tonic::Code::Unavailable, "{silent:?}");
    c.restart_node(2, None).await;
    assert_eq!(
        c.copies(&vol).await,
        vec![(0, pb::Role::Primary)],
        "nothing moved"
    );
    try_publish(&c, 1, &vol).await.unwrap();
    ctl_unpublish(&c, &vol, "node-b").await;
    assert_moved(&c, 1, &vol, &hash).await;
}

/// The controller is killed at each step of a hand-off; a new controller, knowing nothing
/// but the nodes' inventories, finishes the move on the retried publish.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_controller_at_each_step_of_a_move_loses_nothing() {
    let mut c = TestCluster::start(2).await;
    let (vol, hash) = volume_with_data(&c, "pvc-controller", 64, &[]).await;
    let mut at = 0;
    for step in [
        "handoff:after-fence",
        "handoff:after-ship",
        "handoff:after-promote",
    ] {
        let to = 1 - at;
        c.restart_controller(Some(step)).await;
        assert!(
            try_publish(&c, to, &vol).await.is_err(),
            "{step}: the controller died"
        );
        c.restart_controller(None).await;
        try_publish(&c, to, &vol)
            .await
            .unwrap_or_else(|e| panic!("{step}: retry: {e:?}\n{}", c.logs()));
        ctl_unpublish(&c, &vol, &c.nodes[to].id).await;
        assert_moved(&c, to, &vol, &hash).await;
        at = to;
    }
}

/// replicas=2 keeps a second copy fresh while the volume is in use, reports its lag in
/// ControllerGetVolume, and a replica's failure mid-round heals on the next round.
#[tokio::test(flavor = "multi_thread")]
async fn replication_keeps_a_fresh_copy_and_reports_its_lag() {
    let mut c = TestCluster::start(3).await;
    let vol = create_block(
        &c,
        "pvc-repl",
        0,
        &[("replicas", "2"), ("replicationInterval", "1s")],
    )
    .await;
    let dev = attach(&c, 0, &vol).await;
    write_pattern(&dev, 0, 8 << 20, 9);
    let replica_node = async |c: &TestCluster| -> Option<usize> {
        c.copies(&vol)
            .await
            .into_iter()
            .find(|(_, r)| *r == pb::Role::Replica)
            .map(|(i, _)| i)
    };
    c.wait_until("a replica", Duration::from_secs(30), || async {
        replica_node(&c).await.is_some()
    })
    .await;
    let r = replica_node(&c).await.unwrap();
    assert_ne!(r, 0);
    let got = c
        .ctl()
        .await
        .controller_get_volume(get_volume_req(&vol))
        .await
        .unwrap()
        .into_inner();
    let msg = got.status.unwrap().volume_condition.unwrap().message;
    assert!(
        msg.contains("replicas:") && msg.contains(&c.nodes[r].id),
        "{msg}"
    );

    // The replica dies mid-round; the volume keeps serving; the next rounds heal it.
    c.restart_node(r, Some("receive:before-accept")).await;
    write_pattern(&dev, 64 << 20, 8 << 20, 10);
    c.wait_node_exit(r, Duration::from_secs(30)).await;
    c.restart_node(r, None).await;
    let wait_round = async |c: &TestCluster, r: usize| {
        let before = c.counters(r).await.transfers_completed;
        c.wait_until("a replication round", Duration::from_secs(30), || async {
            c.counters(r).await.transfers_completed > before
        })
        .await;
    };
    wait_round(&c, r).await;
    // The controller dies after cutting a round's snapshot, and then the primary's node
    // process dies while it streams (the volume stays mounted and in use: the kernel holds
    // it). A new controller and the restarted node carry on replicating.
    c.restart_controller(Some("replicate:after-snapshot")).await;
    write_pattern(&dev, 96 << 20, 8 << 20, 11);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while c.controller.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the controller's failpoint never fired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.restart_controller(None).await;
    wait_round(&c, r).await;
    c.restart_node(0, Some("send:chunk")).await;
    write_pattern(&dev, 128 << 20, 8 << 20, 12);
    c.wait_node_exit(0, Duration::from_secs(30)).await;
    c.restart_node(0, None).await;
    write_pattern(&dev, 160 << 20, 8 << 20, 13);
    wait_round(&c, r).await;
    wait_round(&c, r).await;

    let on_a = device_hash(&dev);
    detach(&c, 0, &vol).await;
    // The replica holder becomes primary with the latest data.
    let dev_r = attach(&c, r, &vol).await;
    assert_eq!(device_hash(&dev_r), on_a);
    detach(&c, r, &vol).await;
}

/// A snapshot taken on one node restores on another: it is shipped there first.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_restores_on_a_node_that_did_not_hold_it() {
    let c = TestCluster::start(2).await;
    let (vol, hash) = volume_with_data(&c, "pvc-snap-src", 16, &[]).await;
    let ctl = c.ctl().await;
    let snap = create_snapshot(&ctl, "snap-x", &vol).await;
    let mut req = from_snapshot(
        create_req("pvc-restored", VOL, block_cap()),
        &snap.snapshot_id,
    );
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: [(
                "topology.berth.csi.dev/node".to_string(),
                "node-b".to_string(),
            )]
            .into(),
        }],
    });
    let restored = create_volume(&ctl, req).await;
    assert_eq!(
        c.copies(&restored.volume_id).await,
        vec![(1, pb::Role::Primary)]
    );
    let dev = attach(&c, 1, &restored.volume_id).await;
    assert_eq!(device_hash(&dev), hash);
    detach(&c, 1, &restored.volume_id).await;
    // SnapshotMetadata through the cluster controller: the holder's answer, passed on.
    let mut meta = csi::snapshot_metadata_client::SnapshotMetadataClient::new(
        berth::client::connect(&c.controller_endpoint())
            .await
            .unwrap(),
    );
    let mut stream = meta
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = 0;
    while let Some(m) = stream.message().await.unwrap() {
        bytes += m.block_metadata.iter().map(|b| b.size_bytes).sum::<i64>();
    }
    assert_eq!(bytes, 16 << 20, "the 16 MiB written, as allocated ranges");
    // Listed once, though two nodes hold it; deleted everywhere.
    let listed = ctl
        .clone()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);
    ctl.clone()
        .delete_snapshot(delete_snapshot_req(&snap.snapshot_id))
        .await
        .unwrap();
    for i in 0..2 {
        assert!(c.inventory(i).await.snapshots.is_empty());
    }
}

/// The cluster controller answers as the spec's tables say, whatever node holds the data:
/// idempotent create (one volume, on one node), same name with other parameters, missing
/// ids, unknown nodes, pagination across nodes, capacity per node and per domain.
#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_controller_follows_the_spec_tables() {
    use tonic::Code;
    let c = TestCluster::start(2).await;
    let ctl = c.ctl().await;

    // CreateVolume: a repeat is the same volume; another size under the same name is
    // ALREADY_EXISTS; volumes spread by free space.
    let a = create_block(&c, "spec-a", 0, &[]).await;
    let again = create_block(&c, "spec-a", 1, &[]).await;
    assert_eq!(
        a, again,
        "a repeat answers with the first volume, wherever asked"
    );
    assert_eq!(c.copies(&a).await, vec![(0, pb::Role::Primary)]);
    let err = ctl
        .clone()
        .create_volume(create_req("spec-a", 2 * VOL, block_cap()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let b = create_volume(&ctl, create_req("spec-b", VOL, block_cap())).await;
    // A clone without topology goes where its source is, whatever node has more room.
    let clone = create_volume(
        &ctl,
        from_volume(create_req("spec-clone", VOL, block_cap()), &a),
    )
    .await;
    assert_eq!(
        c.copies(&clone.volume_id).await,
        vec![(0, pb::Role::Primary)]
    );
    ctl.clone()
        .delete_volume(delete_volume_req(&clone.volume_id))
        .await
        .unwrap();

    // Deletes and unpublishes of what does not exist succeed.
    let unknown = "vol-00000000000000000000000000000000";
    ctl.clone()
        .delete_volume(delete_volume_req(unknown))
        .await
        .unwrap();
    ctl.clone()
        .delete_volume(delete_volume_req("not-an-id"))
        .await
        .unwrap();
    ctl.clone()
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: unknown.into(),
            node_id: "node-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    ctl.clone()
        .delete_snapshot(delete_snapshot_req("snap-00000000000000000000000000000000"))
        .await
        .unwrap();

    // Publish: unknown volume and unknown node are NOT_FOUND; no capability is
    // INVALID_ARGUMENT.
    for (label, req, want) in [
        (
            "unknown volume",
            ctl_publish(unknown, "node-a"),
            Code::NotFound,
        ),
        ("unknown node", ctl_publish(&a, "node-z"), Code::NotFound),
        (
            "no capability",
            csi::ControllerPublishVolumeRequest {
                volume_capability: None,
                ..ctl_publish(&a, "node-a")
            },
            Code::InvalidArgument,
        ),
        (
            // csi-sanity's case: a missing field is reported before any lookup.
            "no capability, unknown volume and node",
            csi::ControllerPublishVolumeRequest {
                volume_capability: None,
                ..ctl_publish("id", "fakenode")
            },
            Code::InvalidArgument,
        ),
    ] {
        let got = ctl
            .clone()
            .controller_publish_volume(req)
            .await
            .unwrap_err()
            .code();
        assert_eq!(got, want, "ControllerPublishVolume: {label}");
    }
    let get = ctl
        .clone()
        .controller_get_volume(get_volume_req(unknown))
        .await
        .unwrap_err();
    assert_eq!(get.code(), Code::NotFound);

    // Routed calls: a missing field is INVALID_ARGUMENT even for a volume no node holds
    // (the node answers the same before its own lookup); a well-formed call for an
    // unknown volume is NOT_FOUND.
    let validate =
        |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
    let expand = |id: &str, bytes: Option<i64>| csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: bytes.map(|b| csi::CapacityRange {
            required_bytes: b,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let modify = |id: &str, params: &[(&str, &str)]| csi::ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    for id in [unknown, a.as_str(), "not-an-id"] {
        let codes = [
            ctl.clone()
                .validate_volume_capabilities(validate(id, vec![]))
                .await
                .map(drop),
            ctl.clone()
                .controller_expand_volume(expand(id, None))
                .await
                .map(drop),
            ctl.clone()
                .controller_modify_volume(modify(id, &[]))
                .await
                .map(drop),
        ]
        .map(|r| r.unwrap_err().code());
        assert_eq!(codes, [Code::InvalidArgument; 3], "missing fields, {id}");
    }
    let codes = [
        ctl.clone()
            .validate_volume_capabilities(validate(unknown, vec![block_cap()]))
            .await
            .map(drop),
        ctl.clone()
            .controller_expand_volume(expand(unknown, Some(2 * VOL)))
            .await
            .map(drop),
        ctl.clone()
            .controller_modify_volume(modify(unknown, &[("preallocate", "true")]))
            .await
            .map(drop),
    ]
    .map(|r| r.unwrap_err().code());
    assert_eq!(codes, [Code::NotFound; 3], "unknown volume");

    // ListVolumes pages across both nodes; a token berth never issued is ABORTED.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ctl
            .clone()
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 1,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 1);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    seen.sort();
    let mut want = vec![a.clone(), b.volume_id.clone()];
    want.sort();
    assert_eq!(seen, want);
    let bad = ctl
        .clone()
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 1,
            starting_token: "bogus".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Aborted);

    // GetCapacity: a node's own, or the largest any node of the domain can take.
    let cap = |segments: &[(&str, &str)]| csi::GetCapacityRequest {
        volume_capabilities: vec![block_cap()],
        accessible_topology: Some(csi::Topology {
            segments: segments
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }),
        ..Default::default()
    };
    let node_a = ctl
        .clone()
        .get_capacity(cap(&[("topology.berth.csi.dev/node", "node-a")]))
        .await
        .unwrap()
        .into_inner()
        .available_capacity;
    let domain = ctl
        .clone()
        .get_capacity(cap(&[("topology.berth.csi.dev/domain", "default")]))
        .await
        .unwrap()
        .into_inner()
        .available_capacity;
    assert!(node_a > 0 && domain >= node_a, "{node_a} {domain}");
    let nowhere = ctl
        .clone()
        .get_capacity(cap(&[("topology.berth.csi.dev/node", "node-z")]))
        .await
        .unwrap()
        .into_inner()
        .available_capacity;
    assert_eq!(nowhere, 0);
    let elsewhere = ctl
        .clone()
        .get_capacity(cap(&[("topology.berth.csi.dev/domain", "other")]))
        .await
        .unwrap()
        .into_inner()
        .available_capacity;
    assert_eq!(
        elsewhere, 0,
        "another domain's capacity is not this cluster's"
    );

    for v in [a, b.volume_id] {
        ctl.clone()
            .delete_volume(delete_volume_req(&v))
            .await
            .unwrap();
        assert_eq!(c.copies(&v).await, vec![]);
    }
}

/// The cluster controller's /metrics, as Prometheus scrapes it.
fn scrape_controller(c: &TestCluster) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", c.controller_metrics)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_move_shows_in_the_controllers_metrics() {
    let c = TestCluster::start(2).await;
    let vol = create_block(&c, "pvc-metrics", 0, &[]).await;
    let dev = attach(&c, 0, &vol).await;
    write_pattern(&dev, 0, 8 << 20, 1);
    detach(&c, 0, &vol).await;
    attach(&c, 1, &vol).await;
    let text = scrape_controller(&c);
    assert_eq!(
        sample(&text, r#"berth_moves_total{outcome="succeeded"}"#),
        1.0
    );
    assert!(sample(&text, r#"berth_shipped_bytes_total{reason="move"}"#) >= (8 << 20) as f64);
    // Each step of the hand-off, counted against the node it went to.
    for (method, peer) in [
        ("Fence", "node-a"),
        ("Fetch", "node-b"),
        ("Promote", "node-b"),
        ("Settle", "node-a"),
        ("CreateVolume", "node-a"),
    ] {
        let n = sample(
            &text,
            &format!(r#"berth_agent_requests_total{{method="{method}",peer="{peer}",code="OK"}}"#),
        );
        assert!(n >= 1.0, "{method} to {peer}: {n}");
    }
    assert!(
        sample(
            &text,
            r#"berth_agent_requests_total{method="Inventory",peer="node-b",code="OK"}"#
        ) >= 1.0
    );
}
