//! When a node dies (issue 13): a replicated volume whose primary's node is killed or cut
//! off fails over to its replica within the lease duration, the old node fences its copy
//! before that, and when it comes back its copy is kept aside as a snapshot and follows the
//! new primary, shipping only what differs.

mod common;

use std::{
    io::Read,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use berth::{placement::VolumePlacement, proto::agent::v1 as pb};
use common::{cluster::TestCluster, *};

const VOL: i64 = 256 * MIB;
const BLOCK: u64 = 4096;
/// The writer writes the first half of the volume; the second half holds data written
/// before it starts, which a full copy would have to ship again.
const WRITER_BLOCKS: u64 = VOL as u64 / 2 / BLOCK;
const PREFILL: usize = 32 << 20;

async fn create_replicated(
    c: &TestCluster,
    name: &str,
    on: usize,
    extra: &[(&str, &str)],
) -> String {
    let mut req = create_req(name, VOL, block_cap());
    let mut p = vec![("replicas", "2"), ("replicationInterval", "1s")];
    p.extend_from_slice(extra);
    req.parameters = common::params(&p);
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
    create_volume(&c.ctl().await, req).await.volume_id
}

fn ctl_publish(volume_id: &str, node: &str) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node.into(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    }
}

/// ControllerPublish + NodeStage + NodePublish on node `i`, retried while the CO would
/// retry (UNAVAILABLE, ABORTED) until `within`. Returns the device path.
async fn attach_within(c: &TestCluster, i: usize, vol: &str, within: Duration) -> PathBuf {
    let node = c.nodes[i].id.clone();
    let deadline = Instant::now() + within;
    loop {
        let r = c
            .ctl()
            .await
            .controller_publish_volume(ctl_publish(vol, &node))
            .await;
        match r {
            Ok(_) => break,
            Err(e)
                if matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Aborted)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("publish on {node}: {e:?}\n{}", c.logs()),
        }
    }
    let staging = c.nodes[i].path(&format!("{vol}/staging"));
    let target = c.nodes[i].path(&format!("{vol}/target"));
    let mut n = c.node(i).await;
    loop {
        match n
            .node_stage_volume(stage_req(vol, &staging, block_cap()))
            .await
        {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("stage on {node}: {e:?}\n{}", c.logs()),
        }
    }
    n.node_publish_volume(publish_req(vol, &staging, &target, block_cap(), false))
        .await
        .unwrap();
    target
}

async fn attach(c: &TestCluster, i: usize, vol: &str) -> PathBuf {
    attach_within(c, i, vol, Duration::from_secs(30)).await
}

/// NodeUnpublish + NodeUnstage on node `i`: what its kubelet does once the pod is gone.
async fn unstage(c: &TestCluster, i: usize, vol: &str) {
    let staging = c.nodes[i].path(&format!("{vol}/staging"));
    let target = c.nodes[i].path(&format!("{vol}/target"));
    let mut n = c.node(i).await;
    n.node_unpublish_volume(unpublish_req(vol, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(vol, &staging))
        .await
        .unwrap();
}

fn record_of(c: &TestCluster, vol: &str) -> VolumePlacement {
    let store = c.controller_state().join("placement");
    let text = std::fs::read_to_string(store.join(format!("{vol}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v["record"].clone()).unwrap()
}

fn block_of(seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    for chunk in b.chunks_mut(8) {
        chunk.copy_from_slice(&(seq + 1).to_le_bytes());
    }
    b
}

/// What a writer on the old primary managed: how many blocks landed (in order, each
/// synced), and when its first write failed.
#[derive(Default)]
struct Writes {
    done: u64,
    failed_at: Option<Instant>,
    error: String,
}

/// Writes block after block (block `n` holds `n + 1`), each synced, until a write fails.
fn start_writer(dev: &Path) -> Arc<Mutex<Writes>> {
    let w = Arc::new(Mutex::new(Writes::default()));
    let (w2, dev) = (w.clone(), dev.to_path_buf());
    std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .open(&dev)
            .unwrap();
        for n in 0..WRITER_BLOCKS {
            if let Err(e) = f.write_all_at(&block_of(n), n * BLOCK) {
                let mut w = w2.lock().unwrap();
                w.failed_at = Some(Instant::now());
                w.error = e.to_string();
                return;
            }
            w2.lock().unwrap().done = n + 1;
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    w
}

use std::os::unix::fs::OpenOptionsExt;

/// Data in the second half of the volume, written before the writer starts.
fn prefill(dev: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    let data: Vec<u8> = (0..PREFILL).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&data, (VOL as u64) / 2 + (8 << 20)).unwrap();
    f.sync_all().unwrap();
}

/// How many leading blocks hold the writer's pattern; every block after them must be
/// untouched (zero): the copy is a prefix of what the writer did, never a mix.
fn written_prefix(dev: &Path) -> u64 {
    let mut f = std::fs::File::open(dev).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut n = 0;
    loop {
        if f.read_exact(&mut buf).is_err() {
            return n;
        }
        if buf != block_of(n) {
            break;
        }
        n += 1;
    }
    let zero = vec![0u8; BLOCK as usize];
    assert_eq!(buf, zero, "block {n} is neither the pattern nor untouched");
    // A sample of the rest of the writer's half: it writes in order, so nothing past the
    // prefix.
    for b in (n + 1..WRITER_BLOCKS).step_by(97) {
        f.read_exact_at(&mut buf, b * BLOCK).unwrap();
        assert_eq!(buf, zero, "block {b} past the prefix {n} was written");
    }
    n
}

/// Waits until the record names a replica whose snapshot was cut after `after` (unix
/// nanoseconds), i.e. the replica holds what was written before it.
async fn wait_replicated_after(c: &TestCluster, vol: &str, after: i64) {
    c.wait_until(
        "a replica newer than the writes",
        Duration::from_secs(30),
        || async {
            record_of(c, vol).replicas.iter().any(|r| {
                !r.snapshot.is_empty()
                    && berth_time(&r.snapshot_time).is_some_and(|t| t > after / 1_000_000_000)
            })
        },
    )
    .await;
}

fn berth_time(rfc3339: &str) -> Option<i64> {
    let t: k8s_openapi::jiff::Timestamp = rfc3339.parse().ok()?;
    Some(t.as_second())
}

fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Polls the record until it shows a failover; returns when that was first seen.
async fn wait_failover(c: &TestCluster, vol: &str, within: Duration) -> (Instant, VolumePlacement) {
    let deadline = Instant::now() + within;
    loop {
        let r = record_of(c, vol);
        if r.failover.is_some() {
            return (Instant::now(), r);
        }
        assert!(
            Instant::now() < deadline,
            "no failover of {vol} within {within:?}: {r:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until node `i`'s stale copy of `vol` has been demoted; the image of the snapshot
/// it was kept as.
async fn wait_demoted(c: &TestCluster, vol: &str, i: usize) -> PathBuf {
    c.wait_until(
        "the stale copy demoted",
        Duration::from_secs(30),
        || async { record_of(c, vol).failover.is_none() },
    )
    .await;
    let kept = record_of(c, vol)
        .snapshots
        .into_iter()
        .find(|s| s.node == c.nodes[i].id)
        .expect("the stale copy is kept as a snapshot");
    snapshot_image(c, i, &kept.snapshot_id)
}

/// Where node `i` keeps the image of snapshot `id`.
fn snapshot_image(c: &TestCluster, i: usize, id: &str) -> PathBuf {
    c.nodes[i]
        .pool_root()
        .join("berth/snapshots")
        .join(format!("{id}.img"))
}

/// The writer on the old primary failed within fence-after (6 s, and a second of slack)
/// of the node's death at `from`, before the failover was recorded; when it failed.
fn assert_fenced_first(
    writes: &Mutex<Writes>,
    from: Instant,
    failed_over: Instant,
    how: &str,
) -> Instant {
    let w = writes.lock().unwrap();
    let fenced = w.failed_at.expect("the writer was fenced");
    eprintln!(
        "{how} at 0; writes failed at {:?} ({}); failover recorded at {:?}",
        fenced - from,
        w.error,
        failed_over - from
    );
    assert!(
        fenced - from <= Duration::from_secs(7),
        "fenced within fence-after"
    );
    assert!(fenced < failed_over, "fenced before the promotion");
    fenced
}

fn node_index(c: &TestCluster, id: &str) -> usize {
    c.nodes.iter().position(|n| n.id == id).unwrap()
}

/// kill -9 of the primary's node process while a writer writes through its device (the
/// host lives on: the kernel keeps the loop device and the writer). The fence keeper the
/// agent left fences the device within fence-after, before the controller promotes the
/// replica; the volume is then published on the replica's node with exactly the data of
/// the last replicated snapshot. The old node returns after new writes on the new
/// primary: its copy is kept aside as a snapshot, and it follows the new primary, sent
/// only what differs.
#[tokio::test(flavor = "multi_thread")]
async fn killing_the_primarys_node_fails_over_to_the_replica_and_it_returns_as_a_replica() {
    // Two nodes: the returning node is the only place a replica can go back to.
    let mut c = TestCluster::start(2).await;
    let vol = create_replicated(&c, "pvc-killed", 0, &[]).await;
    let dev = attach(&c, 0, &vol).await;
    prefill(&dev);
    let writes = start_writer(&dev);
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_replicated_after(&c, &vol, unix_nanos()).await;

    let epoch = record_of(&c, &vol).epoch;
    c.kill_node(0);
    let killed = Instant::now();
    let (failed_over, rec) = wait_failover(&c, &vol, Duration::from_secs(30)).await;
    assert_fenced_first(&writes, killed, failed_over, "killed");
    let to = node_index(&c, &rec.primary);
    assert_ne!(to, 0);
    let f = rec.failover.clone().unwrap();
    assert_eq!(f.from, c.nodes[0].id);
    assert_eq!(rec.epoch, epoch + 1, "one compare-and-swap: epoch + 1");

    let new_dev = attach(&c, to, &vol).await;
    let storage_part = killed.elapsed();
    eprintln!(
        "published and staged on {} {storage_part:?} after the kill",
        rec.primary
    );
    let snapshot = snapshot_image(&c, 0, &f.snapshot);
    assert_eq!(
        content_hash(&new_dev),
        content_hash(&snapshot),
        "the new primary holds exactly the last replicated snapshot"
    );
    let prefix = written_prefix(&new_dev);
    let done = writes.lock().unwrap().done;
    assert!(prefix > 0 && prefix <= done, "{prefix} of {done} writes");
    eprintln!("writes: {done} landed on the old primary, {prefix} are in the failed-over copy");

    // New writes on the new primary, then the old node comes back. Its kubelet unstages
    // (the pod was deleted); the controller demotes the stale copy.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&new_dev)
        .unwrap()
        .write_all_at(&vec![0xab; 1 << 20], (VOL as u64) / 2 + (4 << 20))
        .unwrap();
    let old_copy = content_hash(
        &c.nodes[0]
            .pool_root()
            .join("berth/volumes")
            .join(format!("{vol}.img")),
    );
    let before = c.counters(to).await.sent_data_bytes;
    c.restart_node(0, None).await;
    let got = c.inventory(0).await;
    let stale = got.volumes.iter().find(|v| v.volume_id == vol).unwrap();
    assert!(
        stale.suspended,
        "the returning node's copy stays fenced: {stale:?}"
    );
    // A stale copy is never staged again.
    let staging = c.nodes[0].path(&format!("{vol}/staging"));
    let refused = c
        .node(0)
        .await
        .node_stage_volume(stage_req(&vol, &staging, block_cap()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    unstage(&c, 0, &vol).await;
    let kept_img = wait_demoted(&c, &vol, 0).await;
    assert_eq!(
        content_hash(&kept_img),
        old_copy,
        "kept as it was, nothing merged or dropped"
    );
    c.wait_until(
        "the old node is a replica again",
        Duration::from_secs(30),
        || async {
            c.inventory(0).await.volumes.iter().any(|v| {
                v.volume_id == vol
                    && v.role == pb::Role::Replica as i32
                    && v.primary_node_id == c.nodes[to].id
            }) && record_of(&c, &vol)
                .replicas
                .iter()
                .any(|r| r.node == c.nodes[0].id && !r.snapshot.is_empty())
        },
    )
    .await;
    let sent = c.counters(to).await.sent_data_bytes - before;
    eprintln!("resync of the returning node sent {sent} bytes of data");
    assert!(
        sent < (PREFILL as u64) / 2,
        "only what differs ships ({sent} bytes; the volume holds over {PREFILL})"
    );
    unstage(&c, to, &vol).await;
}

/// Writes one block at `block` of `dev`, synced; whether it landed.
fn try_write(dev: &Path, block: u64) -> bool {
    let Ok(f) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(dev)
    else {
        return false;
    };
    f.write_all_at(&vec![0xee; BLOCK as usize], block * BLOCK)
        .is_ok()
}

/// How the primary's node goes silent while its host lives on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Silence {
    /// Cut off the network (its agent fences the copy itself).
    Cut,
    /// Its agent frozen by SIGSTOP (the fence keeper fences the copy).
    Frozen,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_cut_off_fences_itself_before_its_volume_fails_over() {
    silent_node_fences_before_its_volume_fails_over(Silence::Cut).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_agent_is_fenced_by_its_keeper_before_its_volume_fails_over() {
    silent_node_fences_before_its_volume_fails_over(Silence::Frozen).await;
}

/// A partition or a frozen agent instead of a crash: the node's copy is fenced (writes
/// fail) before the controller promotes the replica, and no write lands on the old copy
/// after its fence: what the old node kept is exactly what its writer saw acknowledged.
async fn silent_node_fences_before_its_volume_fails_over(how: Silence) {
    let c = match how {
        Silence::Cut => TestCluster::start_isolable(2, &[0]).await,
        Silence::Frozen => TestCluster::start(2).await,
    };
    let vol = create_replicated(&c, "pvc-cut", 0, &[]).await;
    let dev = attach(&c, 0, &vol).await;
    let writes = start_writer(&dev);
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_replicated_after(&c, &vol, unix_nanos()).await;

    match how {
        Silence::Cut => c.isolate_node(0),
        Silence::Frozen => c.stop_node(0),
    }
    let cut = Instant::now();
    let (failed_over, rec) = wait_failover(&c, &vol, Duration::from_secs(30)).await;
    let fenced = assert_fenced_first(&writes, cut, failed_over, &format!("{how:?}"));
    assert!(
        failed_over - fenced >= Duration::from_secs(2),
        "the fence comes well before the promotion"
    );
    // Nothing lands on the fenced copy, wherever it is written.
    let done = writes.lock().unwrap().done;
    let late: Vec<u64> = (0..8).map(|i| WRITER_BLOCKS - 1 - i * 1000).collect();
    for b in &late {
        assert!(
            !try_write(&dev, *b),
            "a write at block {b} landed after the fence"
        );
    }
    let new_dev = attach(&c, 1, &vol).await;
    let prefix = written_prefix(&new_dev);
    assert!(prefix > 0 && prefix <= done, "{prefix} of {done}");

    // Back on the network: the stale copy stays fenced until demoted, and what it kept is
    // exactly the acknowledged writes.
    match how {
        Silence::Cut => c.reconnect_node(0),
        Silence::Frozen => c.cont_node(0),
    }
    c.wait_until("the old node answers", Duration::from_secs(30), || async {
        c.inventory(0)
            .await
            .volumes
            .iter()
            .any(|v| v.volume_id == vol && v.suspended)
    })
    .await;
    assert!(!try_write(&dev, 1), "still fenced after the node came back");
    unstage(&c, 0, &vol).await;
    let kept_img = wait_demoted(&c, &vol, 0).await;
    assert_eq!(
        written_prefix(&kept_img),
        done,
        "the kept copy holds every acknowledged write and nothing after the fence"
    );
    assert_eq!(rec.failover.unwrap().from, c.nodes[0].id);
    unstage(&c, 1, &vol).await;
}

/// A partition shorter than the lease: the node fences itself, but its lease is renewed
/// before it expires, so nothing fails over. The controller gives the copy back by one
/// compare-and-swap (epoch + 1) and writes work again on the same device.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_partition_fences_and_the_controller_resumes_the_copy() {
    let c = TestCluster::start_isolable(2, &[0]).await;
    let vol = create_replicated(&c, "pvc-blip", 0, &[]).await;
    let dev = attach(&c, 0, &vol).await;
    let writes = start_writer(&dev);
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_replicated_after(&c, &vol, unix_nanos()).await;
    let epoch = record_of(&c, &vol).epoch;

    c.isolate_node(0);
    let cut = Instant::now();
    c.wait_until(
        "the node fences itself",
        Duration::from_secs(10),
        || async { writes.lock().unwrap().failed_at.is_some() },
    )
    .await;
    c.reconnect_node(0);
    eprintln!("fenced and reconnected {:?} after the cut", cut.elapsed());
    c.wait_until("the copy resumed", Duration::from_secs(20), || async {
        try_write(&dev, WRITER_BLOCKS - 1)
    })
    .await;
    let rec = record_of(&c, &vol);
    assert!(rec.failover.is_none(), "no failover: {rec:?}");
    assert_eq!(rec.primary, c.nodes[0].id);
    assert_eq!(
        rec.epoch,
        epoch + 1,
        "resumed at a new epoch, by compare-and-swap"
    );
    let inv = c.inventory(0).await;
    let v = inv.volumes.iter().find(|v| v.volume_id == vol).unwrap();
    assert!(!v.suspended && v.epoch == rec.epoch, "{v:?}");
    unstage(&c, 0, &vol).await;
}

/// Two controllers decide to fail the same volume over from the same record: the one
/// that writes second (held by a failpoint) loses its compare-and-swap. One promotion,
/// one epoch step, nodes and record agree.
#[tokio::test(flavor = "multi_thread")]
async fn two_controllers_racing_to_promote_make_one_primary() {
    let mut c = TestCluster::start(3).await;
    let vol = create_replicated(&c, "pvc-race", 0, &[]).await;
    let dev = attach(&c, 0, &vol).await;
    prefill(&dev);
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_replicated_after(&c, &vol, unix_nanos()).await;
    let epoch = record_of(&c, &vol).epoch;
    c.restart_controller(Some("failover:before-record:sleep=4000"))
        .await;
    // The second decides 2 s after the first, which is held 4 s before it writes: both
    // decide from the same record, and the second writes first.
    let second = c.second_controller_with(&["--lease-duration", "12s"]).await;
    c.kill_node(0);
    let (_, rec) = wait_failover(&c, &vol, Duration::from_secs(30)).await;
    // The held controller wakes and writes from its stale read.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rec2 = record_of(&c, &vol);
    assert_eq!(rec2.epoch, epoch + 1, "exactly one promotion: {rec2:?}");
    assert_eq!(rec2.primary, rec.primary);
    let held = c.controller_log();
    assert!(
        held.contains("failpoint reached, holding") && held.contains("changed concurrently"),
        "the held controller decided to promote too, and lost its write\n{held}"
    );
    let logs = format!("{held}{}", second.log());
    let wins = logs.matches("volume failed over from a lost node").count();
    assert_eq!(wins, 1, "one controller's write landed\n{logs}");
    let to = node_index(&c, &rec.primary);
    let primaries: Vec<_> = c
        .inventory(to)
        .await
        .volumes
        .into_iter()
        .filter(|v| v.volume_id == vol && v.role == pb::Role::Primary as i32)
        .collect();
    assert_eq!(primaries.len(), 1);
    assert_eq!(primaries[0].epoch, rec2.epoch);
    drop(second);
    let _ = attach(&c, to, &vol).await;
    unstage(&c, to, &vol).await;
}

/// The controller dies between the record's failover and the promotion: the next one
/// finds the promotion recorded and not made, and makes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_controller_killed_mid_failover_is_finished_by_the_next() {
    let mut c = TestCluster::start(2).await;
    let vol = create_replicated(&c, "pvc-midway", 0, &[]).await;
    let dev = attach(&c, 0, &vol).await;
    prefill(&dev);
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_replicated_after(&c, &vol, unix_nanos()).await;
    c.restart_controller(Some("failover:after-record")).await;
    c.kill_node(0);
    let (_, rec) = wait_failover(&c, &vol, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.controller.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the failpoint never fired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        c.inventory(1)
            .await
            .volumes
            .iter()
            .any(|v| v.volume_id == vol && v.role == pb::Role::Replica as i32),
        "recorded, not yet promoted"
    );
    c.restart_controller(None).await;
    let new_dev = attach(&c, 1, &vol).await;
    // The next controller also announces it (the Event, the pod's release in Kubernetes).
    c.wait_until(
        "the failover announced",
        Duration::from_secs(10),
        || async { c.controller_log().contains("failover complete") },
    )
    .await;
    let snapshot = snapshot_image(&c, 0, &rec.failover.unwrap().snapshot);
    assert_eq!(content_hash(&new_dev), content_hash(&snapshot));
    unstage(&c, 1, &vol).await;
}

/// Runs the `berth` command line against the controller; (success, stdout + stderr).
fn berth_cli(c: &TestCluster, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .arg("--endpoint")
        .arg(c.controller_endpoint())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `failover: manual` keeps the decision with an operator: the lost node's volumes wait,
/// `berth promote` is refused while the node's lease holds and works once it expired, and
/// `berth node-gone` fails every volume of the node over at once. A volume without a
/// replica on the lost node answers UNAVAILABLE naming the node and saying it has none.
#[tokio::test(flavor = "multi_thread")]
async fn manual_failover_waits_for_berth_promote_or_node_gone() {
    let mut c = TestCluster::start(2).await;
    let manual = [("failover", "manual")];
    let one = create_replicated(&c, "pvc-manual-1", 0, &manual).await;
    let two = create_replicated(&c, "pvc-manual-2", 0, &manual).await;
    let only = create_replicated(&c, "pvc-only-copy", 0, &[("replicas", "1")]).await;
    for vol in [&one, &two] {
        let dev = attach(&c, 0, vol).await;
        prefill(&dev);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = unix_nanos();
    wait_replicated_after(&c, &one, now).await;
    wait_replicated_after(&c, &two, now).await;
    let epoch = record_of(&c, &one).epoch;

    c.kill_node(0);
    let (ok, out) = berth_cli(&c, &["promote", &one]);
    assert!(!ok && out.contains("still holds its lease"), "{out}");
    tokio::time::sleep(Duration::from_secs(14)).await;
    for vol in [&one, &two] {
        let r = record_of(&c, vol);
        assert!(
            r.failover.is_none() && r.primary == c.nodes[0].id,
            "manual: no failover by itself: {r:?}"
        );
    }
    // A volume without a replica never fails over: its calls name the node and say why.
    let e = c
        .ctl()
        .await
        .controller_publish_volume(ctl_publish(&only, &c.nodes[1].id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&c.nodes[0].id) && e.message().contains("no replica"),
        "{e:?}"
    );
    assert!(record_of(&c, &only).failover.is_none());
    let (ok, out) = berth_cli(&c, &["promote", &one, "--to", &c.nodes[1].id]);
    assert!(ok, "{out}");
    assert!(out.contains(&c.nodes[1].id), "{out}");
    let r = record_of(&c, &one);
    assert_eq!(
        (r.primary.as_str(), r.epoch),
        (c.nodes[1].id.as_str(), epoch + 1)
    );

    let (ok, out) = berth_cli(&c, &["node-gone", &c.nodes[0].id]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("not failed over: {only}")) && out.contains("no replica"),
        "{out}"
    );
    assert!(
        out.contains(&format!("failed over: {two} -> {}", c.nodes[1].id)),
        "{out}"
    );
    for vol in [&one, &two] {
        let dev = attach(&c, 1, vol).await;
        let snapshot = snapshot_image(&c, 0, &record_of(&c, vol).failover.unwrap().snapshot);
        assert_eq!(content_hash(&dev), content_hash(&snapshot));
        unstage(&c, 1, vol).await;
    }
}

/// The fence keeper fences what the pool's records say when its deadline passes, not a
/// list from the agent's last order: a replicated volume made after the last renewal is
/// fenced too. (The failover bench found it: a volume made a second before its node's
/// agent died was never fenced, and two nodes wrote it.) An unreplicated one is left
/// alone: no one can promote it elsewhere.
#[test]
fn the_fence_keeper_fences_a_volume_made_after_its_last_order() {
    use berth::storage::{
        MutableSettings, RecordState, Replication, VolumeId, VolumeKind, VolumeRecord,
    };
    use std::io::Write;
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let volumes = dir.path().join("volumes");
    std::fs::create_dir_all(&volumes).unwrap();
    let mut keeper = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("fence-keeper")
        .arg("--volumes")
        .arg(&volumes)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut order = keeper.stdin.take().unwrap();
    writeln!(order, r#"{{"within_ms": 1500}}"#).unwrap();
    // Made after the order.
    let mut devices = Vec::new();
    for (name, replicas) in [("made-late", 2), ("single", 1)] {
        let id = VolumeId::for_name(name);
        let image = volumes.join(format!("{id}.img"));
        std::fs::File::create(&image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let record = VolumeRecord {
            id: id.clone(),
            name: name.into(),
            capacity_bytes: 16 << 20,
            kind: VolumeKind::Block,
            source: None,
            settings: MutableSettings::default(),
            labels: Default::default(),
            state: RecordState::Ready,
            published: Default::default(),
            created_unix_nanos: 0,
            epoch: 0,
            fence: None,
            suspended: false,
            replication: Replication {
                replicas,
                ..Default::default()
            },
        };
        std::fs::write(
            volumes.join(format!("{id}.json")),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        devices.push(String::from_utf8(out.stdout).unwrap().trim().to_string());
    }
    std::thread::sleep(Duration::from_millis(2500));
    let limit = |dev: &str| {
        let name = Path::new(dev)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        std::fs::read_to_string(format!("/sys/block/{name}/loop/sizelimit"))
            .unwrap()
            .trim()
            .to_string()
    };
    let fenced = (limit(&devices[0]), limit(&devices[1]));
    drop(order);
    let _ = keeper.wait();
    for d in &devices {
        let _ = std::process::Command::new("losetup")
            .args(["-d", d])
            .status();
    }
    assert_eq!(fenced, ("4096".to_string(), "0".to_string()));
}
