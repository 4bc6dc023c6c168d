//! A cluster on one machine: a controller and three node processes, each with its own pool,
//! socket and agent port. Volumes move between nodes when published elsewhere, replicate,
//! restore from snapshots held on other nodes, and survive kill -9 of any party mid-way.

mod common;

use std::{
    io::{Seek, SeekFrom, Write},
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
    let on_a = content_hash(&dev);

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
    assert_eq!(content_hash(&dev_b), on_a, "bit-identical on B");
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
    let on_b = content_hash(&dev_b);
    detach(&c, 1, &vol).await;
    let before = c.counters(0).await;
    let dev_a = attach(&c, 0, &vol).await;
    assert_eq!(content_hash(&dev_a), on_b, "bit-identical back on A");
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

fn assert_denied<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) {
    match r {
        Err(s) if s.code() == tonic::Code::PermissionDenied => {}
        other => panic!("{what}: expected PERMISSION_DENIED, got {other:?}"),
    }
}

/// A grant signed by `tls`'s key exactly as given (expiry included).
fn signed(tls: &berth::tls::TlsMaterial, body: pb::GrantBody) -> pb::Grant {
    use prost::Message;
    let body = body.encode_to_vec();
    let (scheme, signature, signer_certificate) = tls.sign(&body).unwrap();
    pb::Grant {
        body,
        signer_certificate,
        scheme: scheme.into(),
        signature,
    }
}

/// A node's certificate commands nothing on a peer (fence, promote, delete, the node's CSI
/// Controller: the controller's alone) and pulls only a snapshot the controller granted it;
/// the controller's certificate does both. A client dialling one node refuses another
/// node's agent at that address.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_certificate_cannot_command_its_peers() {
    let c = TestCluster::start(2).await;
    let vol = create_block(&c, "pvc-authz", 0, &[]).await;
    let as_b = c.certs().join("node-b");
    let ch = c.agent_channel_with(0, Some(&as_b)).await.unwrap();
    let mut a = pb::agent_client::AgentClient::new(ch.clone());
    let id = || vol.clone();
    assert_denied("Inventory", a.inventory(pb::InventoryRequest {}).await);
    assert_denied(
        "SyncSnapshot",
        a.sync_snapshot(pb::SyncSnapshotRequest {
            volume_id: id(),
            keep: vec![],
        })
        .await,
    );
    assert_denied(
        "Fence",
        a.fence(pb::FenceRequest {
            volume_id: id(),
            to_node_id: "node-b".into(),
            epoch: 99,
            keep: vec![],
        })
        .await,
    );
    assert_denied(
        "Unfence",
        a.unfence(pb::UnfenceRequest {
            volume_id: id(),
            epoch: 99,
        })
        .await,
    );
    assert_denied(
        "RaiseEpochFloor",
        a.raise_epoch_floor(pb::RaiseEpochFloorRequest {
            volume_id: id(),
            epoch: 99,
        })
        .await,
    );
    assert_denied(
        "Promote",
        a.promote(pb::PromoteRequest {
            volume_id: id(),
            epoch: 99,
            snapshot_id: String::new(),
        })
        .await,
    );
    assert_denied(
        "Settle",
        a.settle(pb::SettleRequest {
            volume_id: id(),
            epoch: 99,
            new_primary_node_id: "node-b".into(),
            keep: false,
        })
        .await,
    );
    assert_denied(
        "Forget",
        a.forget(pb::ForgetRequest { volume_id: id() }).await,
    );
    assert_denied(
        "Fetch",
        a.fetch(pb::FetchRequest {
            volume_id: id(),
            ..Default::default()
        })
        .await,
    );
    let mut ctl = csi::controller_client::ControllerClient::new(ch.clone());
    assert_denied(
        "DeleteVolume",
        ctl.delete_volume(delete_volume_req(&vol)).await,
    );
    assert_denied(
        "CreateSnapshot",
        ctl.create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: id(),
            name: "stolen".into(),
            ..Default::default()
        })
        .await,
    );
    assert_denied(
        "GroupControllerGetCapabilities",
        csi::group_controller_client::GroupControllerClient::new(ch.clone())
            .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
            .await,
    );
    assert_denied(
        "GetMetadataAllocated",
        csi::snapshot_metadata_client::SnapshotMetadataClient::new(ch.clone())
            .get_metadata_allocated(csi::GetMetadataAllocatedRequest::default())
            .await,
    );

    // The controller may: it cuts a shipping snapshot to pull.
    let snap = c
        .agent(0)
        .await
        .sync_snapshot(pb::SyncSnapshotRequest {
            volume_id: id(),
            keep: vec![],
        })
        .await
        .expect("the controller's certificate commands")
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let controller = berth::tls::TlsMaterial::load(&c.certs().join("controller")).unwrap();
    let node_b = berth::tls::TlsMaterial::load(&as_b).unwrap();
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 600;
    let body = |receiver: &str, snapshot: &str, expires: i64| pb::GrantBody {
        snapshot_id: snapshot.into(),
        kind: pb::SnapshotKind::Shipping as i32,
        base_snapshot_id: String::new(),
        source_node_id: "node-a".into(),
        receiver_node_id: receiver.into(),
        expires_unix_seconds: expires,
    };
    let send = |grant: Option<pb::Grant>| pb::SendRequest {
        snapshot_id: snap.clone(),
        kind: pb::SnapshotKind::Shipping as i32,
        base_snapshot_id: String::new(),
        resume_offset: 0,
        grant,
    };
    assert_denied("Send without a grant", a.send(send(None)).await);
    let refused = [
        (
            "a grant node-b signed itself",
            signed(&node_b, body("node-b", &snap, later)),
        ),
        (
            "a grant for node-c",
            signed(&controller, body("node-c", &snap, later)),
        ),
        (
            "a grant for another snapshot",
            signed(&controller, body("node-b", "another", later)),
        ),
        (
            "an expired grant",
            signed(&controller, body("node-b", &snap, later - 1200)),
        ),
        ("a grant altered after signing", {
            let mut g = signed(&controller, body("node-b", &snap, later));
            let i = g.body.len() - 12;
            g.body[i] ^= 1;
            g
        }),
    ];
    for (what, grant) in refused {
        assert_denied(
            &format!("Send with {what}"),
            a.send(send(Some(grant))).await,
        );
    }
    let grant = berth::agent::auth::grant(&controller, body("node-b", &snap, 0)).unwrap();
    let mut stream = a
        .send(send(Some(grant)))
        .await
        .expect("a granted Send is served")
        .into_inner();
    assert!(
        stream.message().await.unwrap().is_some(),
        "the granted stream starts"
    );

    // Dialling node-b's id at node-a's address: node-a's certificate does not name node-b.
    let addr = format!("127.0.0.1:{}", c.nodes[0].port);
    let wrong = berth::agent::channel("node-b", &addr, &controller).unwrap();
    let err = pb::agent_client::AgentClient::new(wrong)
        .inventory(pb::InventoryRequest {})
        .await
        .expect_err("another node's agent answered");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let right = berth::agent::channel("node-a", &addr, &controller).unwrap();
    pb::agent_client::AgentClient::new(right)
        .inventory(pb::InventoryRequest {})
        .await
        .expect("node-a's agent, dialled as node-a");

    // Nothing changed: the volume is still node-a's unfenced primary.
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
    let hash = content_hash(&dev);
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
    assert_eq!(content_hash(&dev), hash, "data intact after the fault");
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
    // As a CO retries: ABORTED while a replication round of the volume runs.
    publish_retrying(c, to, vol, 100)
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
    let hash = content_hash(&dev);
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
    let hash = content_hash(&dev);
    detach(&c, 0, &vol).await;
    let dev_b = attach(&c, 1, &vol).await;
    assert_eq!(
        content_hash(&dev_b),
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
async fn a_silent_node_does_not_stop_a_move_between_others() {
    let mut c = TestCluster::start(3).await;
    let (vol, hash) = volume_with_data(&c, "pvc-silent", 16, &[]).await;
    c.kill_node(2);
    // node-c holds nothing of the volume: its record names node-a only, and the move asks
    // node-a and node-b, never node-c.
    try_publish(&c, 1, &vol).await.unwrap();
    ctl_unpublish(&c, &vol, "node-b").await;
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
    assert_moved(&c, 1, &vol, &hash).await;
    try_publish(&c, 0, &vol).await.unwrap();
    ctl_unpublish(&c, &vol, "node-a").await;
    assert_moved(&c, 0, &vol, &hash).await;
}

/// The placement record of `vol` in the controller's file store.
fn record_of(c: &TestCluster, vol: &str) -> berth::placement::VolumePlacement {
    let store = c.controller_state().join("placement");
    let text = std::fs::read_to_string(store.join(format!("{vol}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v["record"].clone()).unwrap()
}

/// The controller is killed at each step of a hand-off; a new controller, knowing nothing
/// but the nodes' inventories, finishes the move on the retried publish.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_controller_at_each_step_of_a_move_loses_nothing() {
    let mut c = TestCluster::start(2).await;
    let (vol, hash) = volume_with_data(&c, "pvc-controller", 64, &[]).await;
    let mut at = 0;
    for step in [
        "handoff:after-record",
        "handoff:after-fence",
        "handoff:after-ship",
        "handoff:after-promote",
        "handoff:after-record-primary",
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
        // The record and the nodes agree on who is primary, at which epoch.
        let record = record_of(&c, &vol);
        let copy = c
            .inventory(to)
            .await
            .volumes
            .into_iter()
            .find(|v| v.volume_id == vol)
            .unwrap();
        assert_eq!(
            (
                record.primary.as_str(),
                record.epoch,
                record.handoff.is_none()
            ),
            (c.nodes[to].id.as_str(), copy.epoch, true),
            "{step}"
        );
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

    let on_a = content_hash(&dev);
    detach(&c, 0, &vol).await;
    // The replica holder becomes primary with the latest data.
    let dev_r = attach(&c, r, &vol).await;
    assert_eq!(content_hash(&dev_r), on_a);
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
    assert_eq!(content_hash(&dev), hash);
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

/// How often node `i` has held at a `:sleep=` failpoint so far.
fn holds(c: &TestCluster, i: usize) -> usize {
    c.nodes[i]
        .log()
        .matches("failpoint reached, holding")
        .count()
}

/// Starts a move of `vol` to node-b through the first controller, in the background, and
/// waits until `held` says a node holds it at its `:sleep=` failpoint (`what`). Then it
/// cancels the move as a second controller replica would: it publishes the volume back on
/// A, and stages and publishes it there as a block device. Returns the first publish, the
/// second controller, and A's staging and target paths.
async fn cancel_a_held_move(
    c: &TestCluster,
    vol: &str,
    what: &str,
    held: impl Fn() -> bool,
) -> (
    tokio::task::JoinHandle<
        Result<tonic::Response<csi::ControllerPublishVolumeResponse>, tonic::Status>,
    >,
    common::cluster::SecondController,
    PathBuf,
    PathBuf,
) {
    let first = {
        let (endpoint, req) = (c.controller_endpoint(), ctl_publish(vol, "node-b"));
        tokio::spawn(async move {
            csi::controller_client::ControllerClient::new(
                berth::client::connect(&endpoint).await.unwrap(),
            )
            .controller_publish_volume(req)
            .await
        })
    };
    c.wait_until(what, Duration::from_secs(60), || async { held() })
        .await;
    let second = c.second_controller().await;
    second
        .ctl()
        .await
        .controller_publish_volume(ctl_publish(vol, "node-a"))
        .await
        .unwrap_or_else(|e| panic!("publish back on A: {e:?}\n{}", second.log()));
    let staging = c.nodes[0].path(&format!("{vol}/staging"));
    let target = c.nodes[0].path(&format!("{vol}/target"));
    let mut a = c.node(0).await;
    a.node_stage_volume(stage_req(vol, &staging, block_cap()))
        .await
        .unwrap();
    a.node_publish_volume(publish_req(vol, &staging, &target, block_cap(), false))
        .await
        .unwrap();
    (first, second, staging, target)
}

/// Issue 11, item 5: a hand-off cancelled by a second controller while the first one's
/// promotion of the target is still on its way. The promotion arrives after the cancel and
/// loses: one primary in the end (the old one, at the cancel's epoch), and what was written
/// after the cancel survives, and moves, later, where it should.
#[tokio::test(flavor = "multi_thread")]
async fn a_promotion_delayed_past_a_cancel_loses() {
    let mut c = TestCluster::start(2).await;
    let (vol, _) = volume_with_data(&c, "pvc-late-promote", 8, &[]).await;
    c.restart_node(1, Some("promote:start:sleep=6000")).await;
    let (first, _second, staging, target) =
        cancel_a_held_move(&c, &vol, "the promotion of node-b to be on its way", || {
            holds(&c, 1) == 1
        })
        .await;
    let mut a = c.node(0).await;
    write_pattern(&target, 0, 4 << 20, 99);
    let hash = content_hash(&target);

    // The late promotion lands now, at the cancelled hand-off's epoch.
    let late = first.await.unwrap();
    assert!(late.is_err(), "the late promotion won: {late:?}");
    let copies = c.copies(&vol).await;
    let writable: Vec<_> = copies
        .iter()
        .filter(|(_, r)| matches!(r, pb::Role::Primary | pb::Role::Fenced))
        .collect();
    assert_eq!(
        writable,
        vec![&(0, pb::Role::Primary)],
        "exactly one primary, the unfenced one: {copies:?}\n{}",
        c.logs()
    );
    assert!(
        c.nodes[1].log().contains("a hand-off of volume"),
        "node-b refused the promotion by its epoch floor\n{}",
        c.nodes[1].log()
    );
    assert_eq!(content_hash(&target), hash);
    a.node_unpublish_volume(unpublish_req(&vol, &target))
        .await
        .unwrap();
    a.node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
    ctl_unpublish(&c, &vol, "node-a").await;

    // A later hand-off, above the floor, brings what was written after the cancel.
    try_publish(&c, 1, &vol)
        .await
        .unwrap_or_else(|e| panic!("move to B after the cancel: {e:?}\n{}", c.logs()));
    ctl_unpublish(&c, &vol, "node-b").await;
    assert_moved(&c, 1, &vol, &hash).await;
}

/// Issue 11, item 5: the final snapshot of a fenced volume is its image; a cancel makes the
/// image writable again while the target may still be pulling it. The Send running then
/// ends without its trailer, so the torn image it read never verifies anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn an_unfence_stops_the_send_of_the_final_snapshot() {
    let mut c = TestCluster::start(2).await;
    let (vol, _) = volume_with_data(&c, "pvc-torn-send", 4, &[]).await;
    c.restart_node(0, Some("send:chunk:sleep=3000")).await;
    let (first, _second, _staging, target) =
        cancel_a_held_move(&c, &vol, "the final snapshot to be on the wire", || {
            holds(&c, 0) >= 1
        })
        .await;
    // Written while the Send still reads the same inode.
    write_pattern(&target, 0, 4 << 20, 5);

    assert!(first.await.unwrap().is_err(), "the cancelled move failed");
    assert!(
        c.nodes[1].log().contains("was deleted while it was sent"),
        "the Send ended without its trailer, which node-b reports\n{}",
        c.logs()
    );
    assert_eq!(
        c.copies(&vol).await,
        vec![(0, pb::Role::Primary)],
        "node-b kept nothing of the torn stream\n{}",
        c.logs()
    );
    assert_eq!(c.counters(1).await.transfers_completed, 0);
}

/// Issue 11, item 6: Kubernetes detaches a volume by force after 6 minutes while its node
/// may still have it mounted, with the database running. The publish record is gone then,
/// but the volume is still staged and writable: it is not fenced (FAILED_PRECONDITION from
/// the node), no snapshot of it ships, and it moves once it is unstaged.
#[tokio::test(flavor = "multi_thread")]
async fn a_staged_volume_is_not_fenced_after_a_forced_detach() {
    let c = TestCluster::start(2).await;
    let cap = mount_cap("ext4");
    let mut req = create_req("pvc-forced-detach", 256 * MIB, cap.clone());
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: [("topology.berth.csi.dev/node".to_string(), "node-a".into())].into(),
        }],
    });
    let vol = create_volume(&c.ctl().await, req).await.volume_id;
    let publish_on = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: vol.clone(),
        node_id: node.into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    c.ctl()
        .await
        .controller_publish_volume(publish_on("node-a"))
        .await
        .unwrap();
    let staging = c.nodes[0].path(&format!("{vol}/staging"));
    let target = c.nodes[0].path(&format!("{vol}/target"));
    let mut a = c.node(0).await;
    a.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .unwrap();
    a.node_publish_volume(publish_req(&vol, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    std::fs::write(target.join("before"), b"written before the detach").unwrap();

    // The force-detach: the CO unpublishes while the node still has the volume mounted.
    ctl_unpublish(&c, &vol, "node-a").await;
    let err = c
        .ctl()
        .await
        .controller_publish_volume(publish_on("node-b"))
        .await
        .unwrap_err();
    assert_eq!(
        c.copies(&vol).await,
        vec![(0, pb::Role::Primary)],
        "not fenced, nothing shipped: {err:?}\n{}",
        c.logs()
    );
    assert!(
        err.message().contains("still staged"),
        "the fence was refused because the volume is staged: {err:?}"
    );
    assert_eq!(c.counters(1).await.transfers_completed, 0);
    // The database goes on writing, and nothing was lost when it stops.
    std::fs::write(target.join("after"), b"written after the detach").unwrap();
    a.node_unpublish_volume(unpublish_req(&vol, &target))
        .await
        .unwrap();
    a.node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();

    c.ctl()
        .await
        .controller_publish_volume(publish_on("node-b"))
        .await
        .unwrap_or_else(|e| panic!("move after the unstage: {e:?}\n{}", c.logs()));
    let staging = c.nodes[1].path(&format!("{vol}/staging"));
    let target = c.nodes[1].path(&format!("{vol}/target"));
    let mut b = c.node(1).await;
    b.node_stage_volume(stage_req(&vol, &staging, cap.clone()))
        .await
        .unwrap();
    b.node_publish_volume(publish_req(&vol, &staging, &target, cap.clone(), false))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("after")).unwrap(),
        b"written after the detach"
    );
    b.node_unpublish_volume(unpublish_req(&vol, &target))
        .await
        .unwrap();
    b.node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
}

/// Issue 11, item 7: a receive outlives what asked for it. When its controller dies while
/// the receive holds after verifying, it keeps no snapshot and writes no replica record.
/// When another controller deletes the volume while the receive holds between keeping the
/// snapshot and recording the replica (its asker gone too), the delete waits for it
/// (ABORTED, retried as a CO does) and then removes both: the volume does not come back.
#[tokio::test(flavor = "multi_thread")]
async fn orphaned_fetches_record_no_replica() {
    let mut c = TestCluster::start(2).await;
    let (vol, _) = volume_with_data(&c, "pvc-orphan", 8, &[]).await;
    c.restart_node(1, Some("receive:before-accept:sleep=4000"))
        .await;
    let publish = |c: &TestCluster| {
        let (endpoint, req) = (c.controller_endpoint(), ctl_publish(&vol, "node-b"));
        tokio::spawn(async move {
            csi::controller_client::ControllerClient::new(
                berth::client::connect(&endpoint).await.unwrap(),
            )
            .controller_publish_volume(req)
            .await
        })
    };
    let replica_record = c.nodes[1]
        .pool_root()
        .join("berth")
        .join("replicas")
        .join(format!("{vol}.json"));

    // The asker dies.
    let first = publish(&c);
    c.wait_until("the receive to hold", Duration::from_secs(60), || async {
        holds(&c, 1) == 1
    })
    .await;
    c.kill_controller();
    let _ = first.await;
    let ended = |c: &TestCluster, n: usize| {
        let log = c.nodes[1].log();
        log.matches("fetch failed").count() + log.matches("snapshot received and verified").count()
            >= n
    };
    c.wait_until(
        "the orphaned receive to end",
        Duration::from_secs(30),
        || async { ended(&c, 1) },
    )
    .await;
    assert_eq!(
        c.copies(&vol).await,
        vec![(0, pb::Role::Fenced)],
        "no replica from a receive nobody waits for\n{}",
        c.logs()
    );
    assert!(!replica_record.exists());
    assert!(c.nodes[1].log().contains("went away"));

    // The volume is deleted (by another controller) while a receive of it holds.
    c.restart_node(1, Some("receive:before-record:sleep=4000"))
        .await;
    c.spawn_controller().await;
    let second_try = publish(&c);
    c.wait_until("the receive to hold", Duration::from_secs(60), || async {
        holds(&c, 1) == 2
    })
    .await;
    // Its asker gives up too, so nothing continues the move once the receive records.
    c.kill_controller();
    let _ = second_try.await;
    let other = c.second_controller().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match other
            .ctl()
            .await
            .delete_volume(delete_volume_req(&vol))
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::Aborted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("delete: {e:?}\n{}", other.log()),
        }
    }
    c.wait_until(
        "the receive of the deleted volume to end",
        Duration::from_secs(30),
        || async { ended(&c, 2) },
    )
    .await;
    assert_eq!(
        c.copies(&vol).await,
        vec![],
        "the deleted volume did not come back\n{}",
        c.logs()
    );
    assert!(!replica_record.exists());
}

/// Publishes a filesystem volume (ext4) on node `i`; returns the mounted target.
async fn attach_fs(c: &TestCluster, i: usize, vol: &str) -> PathBuf {
    let node = c.nodes[i].id.clone();
    let mut req = ctl_publish(vol, &node);
    req.volume_capability = Some(mount_cap("ext4"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match c.ctl().await.controller_publish_volume(req.clone()).await {
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
    n.node_stage_volume(stage_req(vol, &staging, mount_cap("ext4")))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(
        vol,
        &staging,
        &target,
        mount_cap("ext4"),
        false,
    ))
    .await
    .unwrap();
    target
}

/// Issue 11, item 1: after a trim, the next delta holds one Zero piece far longer than a
/// chunk (the freed extents of a deleted file). It must replicate, and the volume must
/// move, rather than fail verification on every retry.
#[tokio::test(flavor = "multi_thread")]
async fn a_trimmed_volume_replicates_and_moves() {
    let c = TestCluster::start(2).await;
    let mut req = create_req("pvc-trim", VOL, mount_cap("ext4"));
    req.parameters = common::params(&[("replicas", "2"), ("replicationInterval", "1s")]);
    let vol = create_volume(&c.ctl().await, req).await.volume_id;
    let on = c
        .copies(&vol)
        .await
        .first()
        .map(|(i, _)| *i)
        .expect("created");
    let other = 1 - on;
    let target = attach_fs(&c, on, &vol).await;
    let big = target.join("big");
    for f in [&big, &target.join("keep")] {
        std::fs::File::create(f).unwrap();
    }
    write_pattern(&big, 0, 96 << 20, 5);
    write_pattern(&target.join("keep"), 0, 1 << 20, 6);
    let keep = content_hash(&target.join("keep"));
    c.wait_until(
        "the file on the replica",
        Duration::from_secs(60),
        || async { c.counters(other).await.received_data_bytes >= 96 << 20 },
    )
    .await;

    std::fs::remove_file(&big).unwrap();
    // ext4 frees a deleted file's blocks for trimming only once its journal commits.
    let sync = std::process::Command::new("sync")
        .arg("-f")
        .arg(&target)
        .status()
        .unwrap();
    assert!(sync.success());
    let trim = std::process::Command::new("fstrim")
        .arg("-v")
        .arg(&target)
        .output()
        .unwrap();
    assert!(trim.status.success(), "fstrim: {trim:?}");
    let before = c.counters(other).await;
    c.wait_until(
        "a replication round after the trim",
        Duration::from_secs(60),
        || async {
            let now = c.counters(other).await;
            now.transfers_completed > before.transfers_completed
                && now.received_zero_bytes >= before.received_zero_bytes + (64 << 20)
        },
    )
    .await;
    let after = c.counters(other).await;
    assert_eq!(
        after.chunks_rejected, before.chunks_rejected,
        "no chunk refused: {after:?}"
    );

    // The move ships the trimmed image against the replica's base, and what arrives is
    // the filesystem without the file.
    let staging = c.nodes[on].path(&format!("{vol}/staging"));
    let mut n = c.node(on).await;
    n.node_unpublish_volume(unpublish_req(&vol, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&vol, &staging))
        .await
        .unwrap();
    ctl_unpublish(&c, &vol, &c.nodes[on].id).await;
    let moved = attach_fs(&c, other, &vol).await;
    assert_eq!(content_hash(&moved.join("keep")), keep);
    assert!(!moved.join("big").exists());
}

/// Issue 11, item 3: a move into a nearly full node is refused, with RESOURCE_EXHAUSTED,
/// whether the data does not fit (the target's Fetch reserves it first) or the volume does
/// not (its Promote reserves the volume's capacity); the volume stays whole where it was,
/// and the target's room for its own volumes is what it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_into_a_nearly_full_node_is_refused() {
    let c = TestCluster::start(2).await;
    let (big, big_hash) = volume_with_data(&c, "pvc-full-data", 200, &[]).await;
    let (small, small_hash) = volume_with_data(&c, "pvc-full-size", 16, &[]).await;
    // Node B keeps 64 MiB: room for the small volume's data, not for the big one's data
    // nor for the small one's 512 MiB capacity.
    let room = c.inventory(1).await.available_bytes;
    let mut req = create_req("pvc-filler", (room - (64 << 20)) as i64, block_cap());
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: [(
                "topology.berth.csi.dev/node".to_string(),
                c.nodes[1].id.clone(),
            )]
            .into(),
        }],
    });
    let filler = create_volume(&c.ctl().await, req).await.volume_id;
    assert!(c.copies(&filler).await.contains(&(1, pb::Role::Primary)));
    // The pool's real free space drifts by a few MiB under load (XFS metadata, and blocks
    // that its background inode inactivation frees late), so room is compared within
    // that drift: what matters is that no refused move takes any of it.
    let drift = 8 << 20;
    let near = |got: u64, want: u64| got.abs_diff(want) <= drift;
    let before = c.inventory(1).await.available_bytes;
    assert!(near(before, 64 << 20), "B keeps about 64 MiB, not {before}");

    for vol in [&big, &small] {
        let err = try_publish(&c, 1, vol).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::ResourceExhausted,
            "{err:?}\n{}",
            c.logs()
        );
        // Named once: the move's own error already names the node that refused.
        assert!(
            err.message().starts_with("node node-b: ")
                && !err.message().contains("node node-b: node node-b"),
            "{err:?}"
        );
        // The refused big receive released its reservation. The small volume's refused
        // promotion leaves its 16 MiB snapshot as a replica, which the free-space bound
        // counts twice (its blocks are gone from the real free space, and reserved), so
        // B then offers 32 MiB less.
        let kept = if vol == &big {
            before
        } else {
            before - (32 << 20)
        };
        if vol == &big {
            let got = c.counters(1).await.received_data_bytes;
            assert_eq!(got, 0, "refused before any data was written");
        }
        let now = c.inventory(1).await.available_bytes;
        assert!(near(now, kept), "B offers {now} bytes, {kept} expected");
    }
    assert!(c.copies(&filler).await.contains(&(1, pb::Role::Primary)));
    // Both volumes come home whole: publishing on A cancels the refused hand-offs.
    for (vol, hash) in [(&big, &big_hash), (&small, &small_hash)] {
        let dev = attach(&c, 0, vol).await;
        assert_eq!(&content_hash(&dev), hash, "data intact after the refusal");
        detach(&c, 0, vol).await;
        assert!(c.copies(vol).await.contains(&(0, pb::Role::Primary)));
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
            r#"berth_agent_requests_total{method="Inventory",peer="node-a",code="OK"}"#
        ) >= 1.0
    );
    // A call about the volume asks only the nodes its placement record names: node-b held
    // nothing of it until the hand-off made it the target (the background poll is counted
    // apart, in berth_node_polls_total).
    assert!(
        !text.contains(r#"berth_agent_requests_total{method="Inventory",peer="node-b""#),
        "{text}"
    );
    assert!(
        sample(
            &text,
            r#"berth_node_polls_total{node="node-b",outcome="answered"}"#
        ) >= 1.0
    );
}

/// A preference for `node`, as the scheduler's pick arrives in CreateVolume.
fn prefer(node: &str) -> csi::TopologyRequirement {
    csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: [("topology.berth.csi.dev/node".to_string(), node.to_string())].into(),
        }],
    }
}

/// How node-c falls silent (issue 12): each keeps its volumes out of reach in its own way.
#[derive(Debug, Clone, Copy)]
enum Silence {
    /// SIGKILL: connections are refused at once.
    Killed,
    /// SIGSTOP: the kernel still accepts connections, and nothing answers on them.
    Frozen,
    /// Its network namespace cut off: packets vanish both ways.
    CutOff,
}

/// Every CO call in the blast-radius test gets this deadline: a hang fails the test
/// instead of hanging it.
const CALL_DEADLINE: Duration = Duration::from_secs(20);

/// The calls made about volumes away from the silent node, and how they went.
#[derive(Default)]
struct Tally {
    calls: usize,
    errors: Vec<String>,
    slowest: (Duration, String),
}

impl Tally {
    /// Makes one call with [`CALL_DEADLINE`]; counts a failure or a hang as an error.
    async fn ok<T>(
        &mut self,
        what: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Option<T> {
        self.calls += 1;
        let start = std::time::Instant::now();
        let r = tokio::time::timeout(CALL_DEADLINE, call).await;
        let took = start.elapsed();
        if took > self.slowest.0 {
            self.slowest = (took, what.to_string());
        }
        match r {
            Ok(Ok(r)) => Some(r.into_inner()),
            Ok(Err(e)) => {
                self.errors.push(format!("{what}: {e:?}"));
                None
            }
            Err(_) => {
                self.errors
                    .push(format!("{what}: no answer within {CALL_DEADLINE:?}"));
                None
            }
        }
    }
}

/// A call about a volume on the silent node: it answers within the deadline.
async fn answer<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(CALL_DEADLINE, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_DEADLINE:?}"))
        .map(tonic::Response::into_inner)
}

/// UNAVAILABLE (a retry can succeed) naming the silent node.
fn assert_unavailable_naming<T: std::fmt::Debug>(
    what: &str,
    node: &str,
    r: Result<T, tonic::Status>,
) {
    let err = r.expect_err(what);
    assert_eq!(err.code(), tonic::Code::Unavailable, "{what}: {err:?}");
    assert!(err.message().contains(node), "{what}: {err:?}");
}

/// The nodes among `among` holding a copy of `vol`, asking only them (and each with a
/// deadline), never the silent one.
async fn holders(c: &TestCluster, vol: &str, among: &[usize]) -> Vec<(usize, pb::Role)> {
    let mut out = Vec::new();
    for &i in among {
        let inv = tokio::time::timeout(CALL_DEADLINE, c.inventory(i))
            .await
            .unwrap_or_else(|_| panic!("{}'s inventory", c.nodes[i].id));
        for v in inv.volumes {
            if v.volume_id == vol {
                out.push((i, pb::Role::try_from(v.role).unwrap()));
            }
        }
    }
    out
}

/// The condition ControllerGetVolume reports for `vol`.
async fn condition(c: &TestCluster, vol: &str) -> csi::VolumeCondition {
    answer(
        "ControllerGetVolume",
        c.ctl().await.controller_get_volume(get_volume_req(vol)),
    )
    .await
    .unwrap_or_else(|e| panic!("ControllerGetVolume {vol}: {e:?}\n{}", c.logs()))
    .status
    .and_then(|s| s.volume_condition)
    .expect("berth reports VOLUME_CONDITION")
}

/// When the newest shipping snapshot replica holder `i` has of `vol` was cut.
async fn newest_replica_snapshot(c: &TestCluster, i: usize, vol: &str) -> Option<i64> {
    let inv = tokio::time::timeout(CALL_DEADLINE, c.inventory(i))
        .await
        .expect("the replica holder's inventory");
    inv.volumes
        .iter()
        .find(|v| v.volume_id == vol && v.role == pb::Role::Replica as i32)
        .and_then(|v| v.shipping.last())
        .map(|s| s.created_unix_nanos)
}

fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Issue 12, item 3: while node-c is silent, volumes with no copy on it behave as if the
/// cluster were healthy, and the one on it answers UNAVAILABLE naming node-c, with an
/// abnormal condition; once node-c is back, that volume works again.
async fn one_silent_node_costs_only_its_own_volumes(how: Silence) {
    let (a, b, silent) = (0, 1, 2);
    // node-c in a network namespace in every case, so that the three cases differ only in
    // how it falls silent. Nothing is moved or replicated to it (it could not pull).
    let mut c = TestCluster::start_isolable(3, &[silent]).await;
    let node_c = c.nodes[silent].id.clone();

    // Before: node-c's volumes first, so that node-c is not the emptiest node when the
    // replicated volume's replica is placed (the emptiest node gets it), and small, so that
    // it is the emptiest afterwards (an unskipped node-c would get every new volume).
    let on_c_small = async |name: &str| {
        let mut req = create_req(name, 64 * MIB, block_cap());
        req.accessibility_requirements = Some(prefer(&node_c));
        create_volume(&c.ctl().await, req).await.volume_id
    };
    let on_c = on_c_small("pvc-on-c").await;
    // Deleted while node-c is silent.
    let deleted_on_c = on_c_small("pvc-deleted-on-c").await;
    let repl = create_block(
        &c,
        "pvc-replicated",
        a,
        &[("replicas", "2"), ("replicationInterval", "1s")],
    )
    .await;
    let dev_repl = attach(&c, a, &repl).await;
    write_pattern(&dev_repl, 0, 4 << 20, 21);
    c.wait_until(
        "the first replication round",
        Duration::from_secs(30),
        || async { newest_replica_snapshot(&c, b, &repl).await.is_some() },
    )
    .await;
    let (to_move, moved_hash) = volume_with_data(&c, "pvc-to-move", 8, &[]).await;
    let on_b = create_block(&c, "pvc-on-b", b, &[]).await;
    assert_eq!(c.copies(&on_c).await, vec![(silent, pb::Role::Primary)]);
    // node-c is the emptiest node: while it answers, a volume without a preference goes
    // there. So one placed elsewhere below was placed elsewhere because node-c is silent.
    let probe = create_volume(&c.ctl().await, create_req("pvc-probe", VOL, block_cap()))
        .await
        .volume_id;
    assert_eq!(c.copies(&probe).await, vec![(silent, pb::Role::Primary)]);
    delete_volume(&c.ctl().await, &probe).await;
    assert_eq!(
        c.copies(&repl).await,
        vec![(a, pb::Role::Primary), (b, pb::Role::Replica)]
    );

    let silenced_at = unix_nanos();
    let silenced = std::time::Instant::now();
    match how {
        Silence::Killed => c.kill_node(silent),
        Silence::Frozen => c.stop_node(silent),
        Silence::CutOff => c.isolate_node(silent),
    }
    c.wait_until(
        "the controller to see node-c silent",
        Duration::from_secs(30),
        || async { condition(&c, &on_c).await.abnormal },
    )
    .await;
    let noticed = silenced.elapsed();

    // Volumes with no copy on node-c: every call answers, at once.
    let mut t = Tally::default();
    let ctl = c.ctl().await;
    let mut created = Vec::new();
    for k in 0..3 {
        let name = format!("pvc-new-{k}");
        let Some(r) = t
            .ok(
                "CreateVolume",
                ctl.clone()
                    .create_volume(create_req(&name, VOL, block_cap())),
            )
            .await
        else {
            continue;
        };
        let vol = r.volume.expect("volume").volume_id;
        assert_eq!(
            holders(&c, &vol, &[a, b]).await.len(),
            1,
            "{name} is on node-a or node-b, never the silent node-c"
        );
        created.push(vol);
    }
    let mut prefer_c = create_req("pvc-prefers-c", VOL, block_cap());
    prefer_c.accessibility_requirements = Some(prefer(&node_c));
    if let Some(r) = t
        .ok(
            "CreateVolume preferring node-c",
            ctl.clone().create_volume(prefer_c),
        )
        .await
    {
        let vol = r.volume.expect("volume").volume_id;
        assert_eq!(
            holders(&c, &vol, &[a, b]).await.len(),
            1,
            "a preference for the silent node-c is passed over"
        );
        created.push(vol);
    }

    // Published in place and unpublished.
    t.ok(
        "ControllerPublishVolume in place",
        ctl.clone()
            .controller_publish_volume(ctl_publish(&on_b, "node-b")),
    )
    .await;
    t.ok(
        "ControllerUnpublishVolume",
        ctl.clone()
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: on_b.clone(),
                node_id: "node-b".into(),
                ..Default::default()
            }),
    )
    .await;
    // A move from node-a to node-b, the data intact.
    if t.ok(
        "ControllerPublishVolume moving node-a to node-b",
        ctl.clone()
            .controller_publish_volume(ctl_publish(&to_move, "node-b")),
    )
    .await
    .is_some()
    {
        let dev = attach(&c, b, &to_move).await;
        assert_eq!(content_hash(&dev), moved_hash, "moved intact");
        detach(&c, b, &to_move).await;
        assert!(
            holders(&c, &to_move, &[a, b])
                .await
                .contains(&(b, pb::Role::Primary)),
            "moved to node-b"
        );
    }
    // Snapshots.
    if let Some(r) = t
        .ok(
            "CreateSnapshot",
            ctl.clone()
                .create_snapshot(snapshot_req("snap-on-b", &on_b)),
        )
        .await
    {
        let snap = r.snapshot.expect("snapshot").snapshot_id;
        if let Some(l) = t
            .ok(
                "ListSnapshots",
                ctl.clone()
                    .list_snapshots(csi::ListSnapshotsRequest::default()),
            )
            .await
        {
            let ids: Vec<_> = l
                .entries
                .into_iter()
                .filter_map(|e| e.snapshot)
                .map(|s| s.snapshot_id)
                .collect();
            assert!(ids.contains(&snap), "{ids:?}");
        }
        t.ok(
            "DeleteSnapshot",
            ctl.clone().delete_snapshot(delete_snapshot_req(&snap)),
        )
        .await;
    }
    t.ok(
        "ControllerExpandVolume",
        ctl.clone()
            .controller_expand_volume(expand_req(&on_b, 2 * VOL, 0)),
    )
    .await;
    for vol in [&on_b, &repl] {
        if let Some(r) = t
            .ok(
                "ControllerGetVolume",
                ctl.clone().controller_get_volume(get_volume_req(vol)),
            )
            .await
        {
            let cond = r
                .status
                .and_then(|s| s.volume_condition)
                .expect("condition");
            assert!(!cond.abnormal, "{vol}: {cond:?}");
        }
    }
    // ListVolumes two at a time: every volume exactly once, node-c's abnormal, naming it.
    let mut listed: Vec<csi::list_volumes_response::Entry> = Vec::new();
    let mut token = String::new();
    loop {
        let Some(page) = t
            .ok(
                "ListVolumes",
                ctl.clone().list_volumes(csi::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: token.clone(),
                }),
            )
            .await
        else {
            break;
        };
        assert!(page.entries.len() <= 2);
        listed.extend(page.entries);
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut ids: Vec<String> = listed
        .iter()
        .map(|e| e.volume.as_ref().expect("entry.volume").volume_id.clone())
        .collect();
    ids.sort();
    let mut want: Vec<String> = [&on_c, &deleted_on_c, &repl, &to_move, &on_b]
        .into_iter()
        .chain(&created)
        .cloned()
        .collect();
    want.sort();
    assert_eq!(
        ids, want,
        "every volume listed exactly once; errors so far: {:#?}",
        t.errors
    );
    for e in &listed {
        let id = &e.volume.as_ref().unwrap().volume_id;
        let cond = e
            .status
            .as_ref()
            .and_then(|s| s.volume_condition.clone())
            .expect("ListVolumes reports VOLUME_CONDITION");
        if *id == on_c || *id == deleted_on_c {
            assert!(cond.abnormal && cond.message.contains(&node_c), "{cond:?}");
        } else {
            assert!(!cond.abnormal, "{id}: {cond:?}");
        }
    }
    for vol in &created {
        t.ok(
            "DeleteVolume",
            ctl.clone().delete_volume(delete_volume_req(vol)),
        )
        .await;
    }
    // Replication of the replicated volume keeps running: a round cut after the silence
    // reaches node-b within a few intervals.
    write_pattern(&dev_repl, 8 << 20, 4 << 20, 22);
    c.wait_until(
        "a replication round after node-c fell silent",
        Duration::from_secs(15),
        || async {
            newest_replica_snapshot(&c, b, &repl)
                .await
                .is_some_and(|at| at > silenced_at)
        },
    )
    .await;

    // The volume on node-c: a precise, retryable error, naming it.
    assert_unavailable_naming(
        "ControllerPublishVolume",
        &node_c,
        answer(
            "ControllerPublishVolume",
            ctl.clone()
                .controller_publish_volume(ctl_publish(&on_c, &node_c)),
        )
        .await,
    );
    assert_unavailable_naming(
        "ControllerUnpublishVolume",
        &node_c,
        answer(
            "ControllerUnpublishVolume",
            ctl.clone()
                .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: on_c.clone(),
                    node_id: node_c.clone(),
                    ..Default::default()
                }),
        )
        .await,
    );
    assert_unavailable_naming(
        "CreateSnapshot",
        &node_c,
        answer(
            "CreateSnapshot",
            ctl.clone()
                .create_snapshot(snapshot_req("snap-on-c", &on_c)),
        )
        .await,
    );
    let cond = condition(&c, &on_c).await;
    assert!(cond.abnormal && cond.message.contains(&node_c), "{cond:?}");
    // A delete that needs node-c is refused before anything is recorded: the volume is
    // still reported on (abnormal, naming node-c) and listed, and the retry completes once
    // node-c answers.
    let delete = async || {
        answer(
            "DeleteVolume",
            ctl.clone().delete_volume(delete_volume_req(&deleted_on_c)),
        )
        .await
    };
    assert_unavailable_naming("DeleteVolume", &node_c, delete().await);
    let cond = condition(&c, &deleted_on_c).await;
    assert!(cond.abnormal && cond.message.contains(&node_c), "{cond:?}");
    let listed = answer(
        "ListVolumes",
        ctl.clone().list_volumes(csi::ListVolumesRequest::default()),
    )
    .await
    .expect("ListVolumes");
    assert!(
        listed
            .entries
            .iter()
            .any(|e| e.volume.as_ref().unwrap().volume_id == deleted_on_c),
        "a volume whose delete was refused is still listed"
    );

    println!(
        "{how:?}: noticed after {noticed:?}; {} of {} calls about volumes away from node-c \
         failed; slowest {:?} ({})",
        t.errors.len(),
        t.calls,
        t.slowest.0,
        t.slowest.1
    );
    assert!(t.errors.is_empty(), "{:#?}\n{}", t.errors, c.logs());

    // node-c back: its volume works again.
    match how {
        Silence::Killed => c.restart_node(silent, None).await,
        Silence::Frozen => c.cont_node(silent),
        Silence::CutOff => c.reconnect_node(silent),
    }
    let restored = std::time::Instant::now();
    c.wait_until(
        "the controller to see node-c back",
        Duration::from_secs(60),
        || async { !condition(&c, &on_c).await.abnormal },
    )
    .await;
    println!("{how:?}: node-c seen back after {:?}", restored.elapsed());
    answer(
        "ControllerPublishVolume",
        ctl.clone()
            .controller_publish_volume(ctl_publish(&on_c, &node_c)),
    )
    .await
    .unwrap_or_else(|e| panic!("publish on node-c once back: {e:?}\n{}", c.logs()));
    ctl_unpublish(&c, &on_c, &node_c).await;
    answer(
        "DeleteVolume",
        ctl.clone().delete_volume(delete_volume_req(&on_c)),
    )
    .await
    .unwrap_or_else(|e| panic!("delete on node-c once back: {e:?}\n{}", c.logs()));
    assert!(c.copies(&on_c).await.is_empty());
    delete()
        .await
        .unwrap_or_else(|e| panic!("retried delete once node-c is back: {e:?}\n{}", c.logs()));
    assert!(c.copies(&deleted_on_c).await.is_empty());
    detach(&c, a, &repl).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_silent_node_costs_only_its_own_volumes_killed() {
    one_silent_node_costs_only_its_own_volumes(Silence::Killed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_silent_node_costs_only_its_own_volumes_frozen() {
    one_silent_node_costs_only_its_own_volumes(Silence::Frozen).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_silent_node_costs_only_its_own_volumes_cut_off() {
    one_silent_node_costs_only_its_own_volumes(Silence::CutOff).await;
}

/// Where `vol`'s copies are on the nodes at `answering`, next to what its placement record
/// says: the writable copies with their epochs, the replicas' nodes, the CSI snapshots with
/// the node of each, and whether a hand-off is in flight. Returns what differs.
async fn record_vs_nodes(c: &TestCluster, vol: &str, answering: &[usize]) -> Result<(), String> {
    use std::collections::BTreeSet;
    let r = record_of(c, vol);
    let mut writable = Vec::new();
    let mut replicas = BTreeSet::new();
    let mut snapshots = BTreeSet::new();
    for &i in answering {
        let inv = c.inventory(i).await;
        let node = c.nodes[i].id.clone();
        for v in inv.volumes.iter().filter(|v| v.volume_id == vol) {
            match pb::Role::try_from(v.role).unwrap() {
                pb::Role::Primary | pb::Role::Fenced => writable.push((node.clone(), v.epoch)),
                pb::Role::Replica => {
                    replicas.insert(node.clone());
                }
                pb::Role::Unspecified => {}
            }
        }
        for s in inv.snapshots.iter().filter(|s| s.source_volume_id == vol) {
            snapshots.insert((s.snapshot_id.clone(), node.clone()));
        }
    }
    let nodes = (writable, replicas, snapshots, None);
    let record = (
        vec![(r.primary.clone(), r.epoch)],
        r.replicas.iter().map(|x| x.node.clone()).collect(),
        r.snapshots
            .iter()
            .map(|s| (s.snapshot_id.clone(), s.node.clone()))
            .collect(),
        r.handoff.clone(),
    );
    match nodes == record {
        true => Ok(()),
        false => Err(format!(
            "(writable copies, replicas, snapshots, hand-off)\n  nodes:  {nodes:?}\n  record: {record:?}"
        )),
    }
}

/// Waits until `vol`'s record agrees with the nodes at `answering` ([`record_vs_nodes`]):
/// a replication round adds its target to the record before the data arrives there.
async fn assert_record_agrees(c: &TestCluster, vol: &str, answering: &[usize], what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match record_vs_nodes(c, vol, answering).await {
            Ok(()) => return,
            Err(diff) if std::time::Instant::now() > deadline => {
                panic!(
                    "{what}: the record of {vol} disagrees with the nodes\n{diff}\n{}",
                    c.logs()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Issue 12, item 5: two controllers over one placement store (two replicas that each
/// believe they lead, or a stale leader) move one volume to two different nodes at once.
/// The compare-and-swap on the record, and the nodes' epochs behind it, let at most one win
/// (both may lose, retryably, and then the CO's retry wins): one primary in the end, the
/// record naming it at its epoch with no hand-off, the data intact.
#[tokio::test(flavor = "multi_thread")]
async fn two_controllers_racing_a_move_agree_on_one_owner() {
    let c = TestCluster::start(3).await;
    let second = c.second_controller().await;
    let (vol, hash) = volume_with_data(&c, "pvc-race", 32, &[]).await;
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    let mut at = 0;
    // The second publish starts this much later (ms): at once both read one version of the
    // record; later, the second finds the first's hand-off recorded, its fence made, its
    // data on the way, or the volume moved and published already.
    let delays = [0, 0, 10, 50, 150, 300, 600, 1200];
    for (round, delay) in delays.into_iter().enumerate() {
        let others: Vec<usize> = (0..3).filter(|&i| i != at).collect();
        // Swapped every other round, so each controller aims at each node and goes first.
        let ((t1, d1), (t2, d2)) = match round % 2 {
            0 => ((others[0], 0), (others[1], delay)),
            _ => ((others[1], delay), (others[0], 0)),
        };
        let (mut ctl1, mut ctl2) = (c.ctl().await, second.ctl().await);
        let (r1, r2) = tokio::join!(
            async {
                tokio::time::sleep(Duration::from_millis(d1)).await;
                ctl1.controller_publish_volume(ctl_publish(&vol, &c.nodes[t1].id))
                    .await
            },
            async {
                tokio::time::sleep(Duration::from_millis(d2)).await;
                ctl2.controller_publish_volume(ctl_publish(&vol, &c.nodes[t2].id))
                    .await
            },
        );
        let (winner, which, lost) = match (&r1, &r2) {
            (Ok(_), Err(e)) => (t1, "controller 1", e),
            (Err(e), Ok(_)) => (t2, "controller 2", e),
            // Both may lose: the second's cancel of the first's hand-off is refused by the
            // fence still being made (ABORTED), and the floor it raised first makes the
            // target refuse that fence, which is then cancelled (UNAVAILABLE). Both answers
            // are retryable, and the CO's retry must then succeed.
            (Err(e1), Err(e2)) => {
                eprintln!("round {round} ({delay} ms): both lost: {e1:?} {e2:?}");
                assert!(
                    [e1, e2].iter().all(|e| matches!(
                        e.code(),
                        tonic::Code::Aborted | tonic::Code::Unavailable
                    )),
                    "round {round}: {e1:?} {e2:?}\n{}\n--- controller 2\n{}",
                    c.logs(),
                    second.log()
                );
                publish_retrying(&c, t1, &vol, 10).await.unwrap_or_else(|e| {
                    panic!(
                        "round {round}: the CO's retry after both lost: {e:?}\n{}\n--- controller 2\n{}",
                        c.logs(),
                        second.log()
                    )
                });
                *outcomes
                    .entry(format!("{delay} ms: both lost, the retry won"))
                    .or_default() += 1;
                ctl_unpublish(&c, &vol, &c.nodes[t1].id).await;
                assert_record_agrees(&c, &vol, &[0, 1, 2], &format!("round {round}")).await;
                assert_eq!(record_of(&c, &vol).primary, c.nodes[t1].id);
                assert_moved(&c, t1, &vol, &hash).await;
                at = t1;
                continue;
            }
            (Ok(_), Ok(_)) => panic!(
                "round {round}: both publishes succeeded: {r1:?} {r2:?}\n{}\n--- controller 2\n{}",
                c.logs(),
                second.log()
            ),
        };
        eprintln!("round {round} ({delay} ms): {which} won; the other: {lost:?}");
        // How the other lost: it read the record at the version the winner's hand-off
        // replaced (ABORTED, nothing touched); or it went first and the winner, finding
        // its hand-off under way, cancelled it and moved the volume to its own target (the
        // interrupted move is UNAVAILABLE: a retry resumes it); or it came after the winner
        // published the volume (FAILED_PRECONDITION, the spec's code for a volume published
        // on another node).
        // ABORTED also comes from the source node itself, when the winner's fence holds
        // the volume's lock there at that moment (the spec's code for a second operation
        // in flight on one volume).
        let why: &[&str] = match lost.code() {
            tonic::Code::Aborted => &["changed concurrently", "is already in progress"],
            tonic::Code::Unavailable => &["moving volume"],
            tonic::Code::FailedPrecondition => &["published to node"],
            _ => &[],
        };
        assert!(
            why.iter().any(|w| lost.message().contains(w)),
            "round {round}: {lost:?}\n{}\n--- controller 2\n{}",
            c.logs(),
            second.log()
        );
        *outcomes
            .entry(format!(
                "{delay} ms: {which} won, the other {:?}",
                lost.code()
            ))
            .or_default() += 1;
        ctl_unpublish(&c, &vol, &c.nodes[winner].id).await;
        assert_record_agrees(&c, &vol, &[0, 1, 2], &format!("round {round}")).await;
        assert_eq!(record_of(&c, &vol).primary, c.nodes[winner].id);
        assert_moved(&c, winner, &vol, &hash).await;
        at = winner;
    }
    eprintln!("outcomes of the racing rounds: {outcomes:?}");
}

/// ControllerPublishVolume on node `i` as a CO retries it: up to `attempts` times while the
/// answer is retryable (ABORTED, UNAVAILABLE). Returns the last answer.
async fn publish_retrying(
    c: &TestCluster,
    i: usize,
    vol: &str,
    attempts: usize,
) -> Result<(), tonic::Status> {
    let mut last = Ok(());
    for _ in 0..attempts {
        last = try_publish(c, i, vol).await;
        match &last {
            Err(e) if matches!(e.code(), tonic::Code::Aborted | tonic::Code::Unavailable) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            _ => break,
        }
    }
    last
}

/// Issue 12, item 5: the controller dies while it cancels a hand-off (it died mid-move, and
/// the CO then publishes the volume back where it was): after the epoch floors were raised,
/// and after the unfence but before the record caught up. A new controller completes the
/// cancel on the CO's retry; the record and the nodes agree on the primary and its epoch,
/// with no hand-off left. And when the CO goes back to the hand-off's target instead (the
/// pod rescheduled there) after the floors were raised, the fence that target now refuses
/// is cancelled and the volume moves there above the floor, instead of every retry resuming
/// a hand-off that can never complete.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_controller_while_it_cancels_a_hand_off_loses_nothing() {
    let mut c = TestCluster::start(2).await;
    let (vol, hash) = volume_with_data(&c, "pvc-cancel-crash", 32, &[]).await;
    for (step, back) in [
        ("cancel:after-floors", 0),
        ("cancel:after-unfence", 0),
        ("cancel:after-floors", 1),
    ] {
        c.restart_controller(Some("handoff:after-fence")).await;
        assert!(
            try_publish(&c, 1, &vol).await.is_err(),
            "{step}: the controller died after the fence"
        );
        assert_eq!(c.copies(&vol).await, vec![(0, pb::Role::Fenced)], "{step}");
        c.restart_controller(Some(step)).await;
        assert!(
            try_publish(&c, 0, &vol).await.is_err(),
            "{step}: the controller died cancelling"
        );
        assert!(
            c.controller_log()
                .lines()
                .any(|l| l.contains("failpoint reached, killing") && l.contains(step)),
            "{step} never fired\n{}",
            c.logs()
        );
        c.restart_controller(None).await;
        publish_retrying(&c, back, &vol, 5)
            .await
            .unwrap_or_else(|e| panic!("{step}: back on {back}: {e:?}\n{}", c.logs()));
        ctl_unpublish(&c, &vol, &c.nodes[back].id).await;
        assert_record_agrees(&c, &vol, &[0, 1], step).await;
        assert_eq!(record_of(&c, &vol).primary, c.nodes[back].id, "{step}");
        assert_moved(&c, back, &vol, &hash).await;
        if back == 1 {
            // Home again for the next case, above node-a's floor.
            publish_retrying(&c, 0, &vol, 1).await.unwrap();
            ctl_unpublish(&c, &vol, "node-a").await;
        }
    }
    try_publish(&c, 1, &vol)
        .await
        .unwrap_or_else(|e| panic!("move after the cancels: {e:?}\n{}", c.logs()));
    ctl_unpublish(&c, &vol, "node-b").await;
    assert_record_agrees(&c, &vol, &[0, 1], "moved after the cancels").await;
    assert_moved(&c, 1, &vol, &hash).await;
}

/// Issue 12, item 4: an upgrade from the release before placement records. Nothing on the
/// nodes changed with them (`git diff e8d22b6 9c39e29 --stat -- src/storage src/agent
/// src/service` is empty): the pools these nodes make are the pools that release made. What
/// it did not have is the controller's store, so the upgrade starts from deleting it, with
/// node-c down at the time. The nodes that answer are adopted at once: every volume on them
/// gets one record matching its copies and snapshots, listed once, and a create of an
/// existing name finds it. A new name is UNAVAILABLE, naming node-c, until node-c answers
/// (it may hold a volume of that name: the documented price); then node-c is adopted too,
/// and nothing is duplicated.
#[tokio::test(flavor = "multi_thread")]
async fn volumes_made_before_placement_records_are_adopted() {
    let mut c = TestCluster::start(3).await;
    let ctl = c.ctl().await;
    let (plain, plain_hash) = volume_with_data(&c, "pvc-up-plain", 8, &[]).await;
    let snap = create_snapshot(&ctl, "snap-up-plain", &plain).await;
    // Volumes that moved after a snapshot of them was cut: the snapshot stays where it was
    // cut. One moved from node-b to node-a, node-b keeping its old copy as a replica; one
    // from node-a to node-b without keeping it, node-a keeping the snapshot only.
    let moved = create_block(&c, "pvc-up-moved", 1, &[]).await;
    let dev = attach(&c, 1, &moved).await;
    write_pattern(&dev, 0, 8 << 20, 3);
    let moved_hash = content_hash(&dev);
    detach(&c, 1, &moved).await;
    let moved_snap = create_snapshot(&ctl, "snap-up-moved", &moved).await;
    try_publish(&c, 0, &moved).await.unwrap();
    ctl_unpublish(&c, &moved, "node-a").await;
    let (dropped, dropped_hash) =
        volume_with_data(&c, "pvc-up-dropped", 8, &[("moveKeepsSource", "false")]).await;
    let dropped_snap = create_snapshot(&ctl, "snap-up-dropped", &dropped).await;
    try_publish(&c, 1, &dropped).await.unwrap();
    ctl_unpublish(&c, &dropped, "node-b").await;
    // A volume deleted before the upgrade whose snapshot was kept (a VolumeSnapshot
    // outlives its claim): that snapshot on node-a is all that is left of it.
    let (gone, gone_hash) = volume_with_data(&c, "pvc-up-gone", 8, &[]).await;
    let gone_snap = create_snapshot(&ctl, "snap-up-gone", &gone).await;
    delete_volume(&ctl, &gone).await;
    let on_c = create_block(&c, "pvc-up-c", 2, &[]).await;
    // Replicated, its primary on node-b; after its first round, no other until the upgrade
    // is over (a round would add its target to the record, which is not adoption's doing).
    let repl = create_block(
        &c,
        "pvc-up-repl",
        1,
        &[("replicas", "2"), ("replicationInterval", "1h")],
    )
    .await;
    c.wait_until(
        "the first replication round",
        Duration::from_secs(60),
        || async {
            c.copies(&repl)
                .await
                .iter()
                .any(|(_, r)| *r == pb::Role::Replica)
        },
    )
    .await;
    let volumes = [&plain, &moved, &dropped, &on_c, &repl];

    c.kill_controller();
    std::fs::remove_dir_all(c.controller_state().join("placement")).unwrap();
    c.kill_node(2);
    c.restart_controller(None).await;
    let ctl = c.ctl().await;
    for v in [&plain, &moved, &dropped, &repl] {
        assert_record_agrees(&c, v, &[0, 1], "adopted with node-c down").await;
    }
    assert_eq!(record_of(&c, &plain).primary, "node-a");
    assert_eq!(record_of(&c, &moved).primary, "node-a");
    assert_eq!(record_of(&c, &dropped).primary, "node-b");
    assert_eq!(record_of(&c, &repl).primary, "node-b");
    let mut listed = list_volume_ids(&ctl).await;
    listed.sort();
    let mut want = vec![plain.clone(), moved.clone(), dropped.clone(), repl.clone()];
    want.sort();
    assert_eq!(
        listed, want,
        "each adopted volume listed once, node-c's not yet"
    );
    let mark = berth::cluster::monitor::adoption_mark().to_string();
    let mut snaps = list_snapshot_ids(&ctl).await;
    snaps.sort();
    let mut want_snaps = vec![
        snap.snapshot_id.clone(),
        moved_snap.snapshot_id.clone(),
        dropped_snap.snapshot_id.clone(),
    ];
    want_snaps.sort();
    // Not yet the deleted volume's snapshot: node-c may hold that volume.
    assert_eq!(snaps, want_snaps);
    // A repeated create of an adopted name is the volume there, even when it prefers
    // another node: no second copy.
    let mut again = create_req("pvc-up-plain", VOL, block_cap());
    again.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: [("topology.berth.csi.dev/node".to_string(), "node-b".into())].into(),
        }],
    });
    assert_eq!(create_volume(&ctl, again).await.volume_id, plain);
    assert_record_agrees(&c, &plain, &[0, 1], "a repeated create").await;
    // A new name may be node-c's volume: it waits for node-c.
    let new = create_req("pvc-up-new", VOL, block_cap());
    let err = ctl.clone().create_volume(new.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("node-c"), "{err:?}");

    c.restart_node(2, None).await;
    let on_c_record = c
        .controller_state()
        .join("placement")
        .join(format!("{on_c}.json"));
    c.wait_until("node-c adopted", Duration::from_secs(30), || async {
        on_c_record.exists()
    })
    .await;
    // The CO's retries of the new name succeed once node-c's adoption is complete (its
    // volumes' records are written before the mark that ends it).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let created = loop {
        match ctl.clone().create_volume(new.clone()).await {
            Ok(r) => break r.into_inner().volume.unwrap().volume_id,
            Err(e)
                if e.code() == tonic::Code::Unavailable
                    && e.message().contains("node-c")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("create after node-c's adoption: {e:?}\n{}", c.logs()),
        }
    };
    // The snapshot of the deleted volume is adopted once every node has answered (node-c
    // might have held the volume): listed, restorable, deleted for real.
    let mut snaps = list_snapshot_ids(&ctl).await;
    snaps.sort();
    want_snaps.push(gone_snap.snapshot_id.clone());
    want_snaps.sort();
    assert_eq!(snaps, want_snaps);
    let restored = create_volume(
        &ctl,
        from_snapshot(
            create_req("pvc-up-restored", VOL, block_cap()),
            &gone_snap.snapshot_id,
        ),
    )
    .await
    .volume_id;
    for v in volumes.iter().copied().chain([&created, &restored]) {
        assert_record_agrees(&c, v, &[0, 1, 2], "every node adopted").await;
    }
    let at = c
        .nodes
        .iter()
        .position(|n| n.id == record_of(&c, &restored).primary)
        .unwrap();
    assert_moved(&c, at, &restored, &gone_hash).await;
    delete_snapshot(&ctl, &gone_snap.snapshot_id).await;
    for i in 0..3 {
        let inv = c.inventory(i).await;
        assert!(
            inv.snapshots.iter().all(|s| s.source_volume_id != gone),
            "{:?}",
            inv.snapshots
        );
    }
    assert_eq!(record_of(&c, &on_c).primary, "node-c");
    eprintln!(
        "replicas of the replicated volume at the end: {:?}",
        record_of(&c, &repl).replicas
    );
    let mut listed = list_volume_ids(&ctl).await;
    listed.sort();
    let mut want: Vec<String> = volumes.iter().map(|v| v.to_string()).collect();
    want.push(created);
    want.push(restored);
    want.sort();
    assert_eq!(listed, want, "every volume listed once");
    assert!(!listed.contains(&mark), "the adoption mark is not a volume");
    assert_moved(&c, 0, &plain, &plain_hash).await;
    assert_moved(&c, 0, &moved, &moved_hash).await;
    assert_moved(&c, 1, &dropped, &dropped_hash).await;
}

/// Two controllers each record their hand-off from the record they read; when the second
/// reads after the first's write, its write stays while the nodes' fence is the first's. If
/// the first then promotes its target and dies before recording it, the record names the
/// second's target and not the promoted primary. Made here directly: the controller dies at
/// handoff:after-promote (node-b promoted), and the record's hand-off is rewritten to
/// node-c. A publish on node-c must find node-b through node-a's fence, not cancel forever
/// against it.
#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_target_missing_from_the_record_is_found_by_its_fence() {
    let mut c = TestCluster::start(3).await;
    let (vol, hash) = volume_with_data(&c, "pvc-lost-target", 16, &[]).await;
    c.restart_controller(Some("handoff:after-promote")).await;
    assert!(try_publish(&c, 1, &vol).await.is_err());
    c.kill_controller();
    let path = c
        .controller_state()
        .join("placement")
        .join(format!("{vol}.json"));
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["record"]["handoff"]["to"], "node-b");
    v["record"]["handoff"]["to"] = "node-c".into();
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    c.restart_controller(None).await;
    publish_retrying(&c, 2, &vol, 5)
        .await
        .unwrap_or_else(|e| panic!("publish on node-c: {e:?}\n{}", c.logs()));
    ctl_unpublish(&c, &vol, "node-c").await;
    let record = record_of(&c, &vol);
    let copy = c
        .inventory(2)
        .await
        .volumes
        .into_iter()
        .find(|v| v.volume_id == vol)
        .unwrap();
    assert_eq!(
        (record.primary.as_str(), record.epoch, record.handoff),
        ("node-c", copy.epoch, None)
    );
    let primaries: Vec<usize> = c
        .copies(&vol)
        .await
        .into_iter()
        .filter(|(_, r)| *r == pb::Role::Primary)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(primaries, vec![2]);
    let dev = attach(&c, 2, &vol).await;
    assert_eq!(content_hash(&dev), hash);
    detach(&c, 2, &vol).await;
}

/// A controller that starts while a volume's replica node is down has never seen that
/// node's inventory; the record still names the replica, and no second one is made
/// elsewhere in its place. When the node returns, rounds go to it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_controller_keeps_a_silent_replica_instead_of_making_another() {
    let mut c = TestCluster::start(3).await;
    let vol = create_block(
        &c,
        "pvc-keep-replica",
        0,
        &[("replicas", "2"), ("replicationInterval", "1s")],
    )
    .await;
    c.wait_until("a first replica", Duration::from_secs(30), || async {
        c.copies(&vol).await.len() == 2
    })
    .await;
    let replica = c
        .copies(&vol)
        .await
        .into_iter()
        .find(|(_, r)| *r == pb::Role::Replica)
        .map(|(i, _)| i)
        .unwrap();
    let other = 3 - replica;
    c.kill_node(replica);
    c.restart_controller(None).await;
    // Several rounds' worth of ticks: a round per second is due all along.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let on_other = c
        .inventory(other)
        .await
        .volumes
        .into_iter()
        .any(|v| v.volume_id == vol);
    assert!(
        !on_other,
        "a second replica was made on {}",
        c.nodes[other].id
    );
    let replicas: Vec<String> = record_of(&c, &vol)
        .replicas
        .into_iter()
        .map(|r| r.node)
        .collect();
    assert_eq!(replicas, [c.nodes[replica].id.clone()]);
    c.restart_node(replica, None).await;
    let before = c.counters(replica).await.transfers_completed;
    c.wait_until(
        "a round to the returned replica",
        Duration::from_secs(30),
        || async { c.counters(replica).await.transfers_completed > before },
    )
    .await;
}

/// A hand-off that promoted its target but died before settling its source leaves a fenced
/// copy behind; a later move to a third node settles it on the way, so no fenced copy
/// outlives the hand-offs that made it.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_onwards_settles_the_source_an_earlier_move_left_fenced() {
    let mut c = TestCluster::start(3).await;
    let (vol, hash) = volume_with_data(&c, "pvc-onwards", 16, &[]).await;
    c.restart_controller(Some("handoff:after-promote")).await;
    assert!(
        try_publish(&c, 1, &vol).await.is_err(),
        "the controller died"
    );
    c.restart_controller(None).await;
    assert!(
        c.copies(&vol).await.contains(&(0, pb::Role::Fenced)),
        "node-a is left fenced: {:?}",
        c.copies(&vol).await
    );
    try_publish(&c, 2, &vol)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", c.logs()));
    ctl_unpublish(&c, &vol, "node-c").await;
    let copies = c.copies(&vol).await;
    assert!(
        !copies.iter().any(|(_, r)| *r == pb::Role::Fenced),
        "{copies:?}"
    );
    assert_moved(&c, 2, &vol, &hash).await;
}

/// Two controllers given the same CreateVolume at once (two replicas of the provisioner's
/// leader, or a retry landing on another replica): the record's create makes one of them
/// place it, the other answers ABORTED or the same volume, and exactly one copy exists.
/// Each round lets the two go at a different offset.
#[tokio::test(flavor = "multi_thread")]
async fn two_controllers_creating_one_name_make_one_volume() {
    let c = TestCluster::start(3).await;
    let second = c.second_controller().await;
    let (one, two) = (c.ctl().await, second.ctl().await);
    for (round, delay) in [0u64, 0, 2, 5, 10].into_iter().enumerate() {
        let name = format!("pvc-twice-{round}");
        let req = create_req(&name, VOL, block_cap());
        let (mut x, mut y) = (one.clone(), two.clone());
        let (a, b) = tokio::join!(x.create_volume(req.clone()), async {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            y.create_volume(req.clone()).await
        });
        let ids: Vec<String> = [&a, &b]
            .into_iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.get_ref().volume.as_ref().unwrap().volume_id.clone())
            .collect();
        assert!(
            !ids.is_empty(),
            "round {round}: neither made it: {a:?} {b:?}"
        );
        assert!(ids.iter().all(|i| i == &ids[0]), "round {round}: {ids:?}");
        for r in [&a, &b] {
            if let Err(e) = r {
                assert_eq!(e.code(), tonic::Code::Aborted, "round {round}: {e:?}");
            }
        }
        // The loser's retry, as the CO makes it, answers the same volume.
        let again = create_volume(&two, req).await;
        assert_eq!(again.volume_id, ids[0], "round {round}");
        assert_eq!(
            c.copies(&ids[0]).await,
            vec![(c.copies(&ids[0]).await[0].0, pb::Role::Primary)],
            "round {round}: one copy"
        );
        assert_eq!(
            record_of(&c, &ids[0]).phase,
            berth::placement::PlacementPhase::Ready
        );
    }
}
