//! Shared harness for the integration tests: runs the real `berth` binary as root on a real
//! pool (sparse image, loop device, XFS with reflink) in a temp dir, and talks to it over its
//! unix socket exactly as a container orchestrator would.
//!
//! These tests need root, loop devices and mkfs.{ext4,xfs}; they fail loudly (never skip)
//! when the machine cannot run them.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

pub use berth::proto::csi::v1 as csi;
use csi::{
    controller_client::ControllerClient, group_controller_client::GroupControllerClient,
    identity_client::IdentityClient, node_client::NodeClient, volume_capability,
};
use tonic::transport::Channel;

pub mod apiserver;
pub mod cluster;
pub mod placement;
pub mod shared;

pub const NODE_ID: &str = "node-1";
pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

pub type Ctl = ControllerClient<Channel>;
pub type Grp = GroupControllerClient<Channel>;

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests drive real loop devices and mounts: run them as root (CI does)"
    );
}

#[derive(Debug, Clone)]
pub struct Options {
    pub pool_size: &'static str,
    pub failpoint: Option<String>,
    pub max_volumes_per_node: Option<u32>,
    pub extra_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pool_size: "16Gi",
            failpoint: None,
            max_volumes_per_node: None,
            extra_args: Vec::new(),
        }
    }
}

/// One all-in-one berth process with its own state dir, pool and socket.
pub struct Driver {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub opts: Options,
}

impl Driver {
    pub async fn start() -> Driver {
        Driver::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Driver {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .expect("tempdir");
        let mut d = Driver {
            dir,
            child: None,
            opts,
        };
        d.spawn().await;
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    pub fn pool_root(&self) -> PathBuf {
        self.state_dir().join("pool")
    }
    /// A path under the test dir for staging/target mounts (the CO's directories).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join("k8s").join(name)
    }
    /// The CO's staging path for the volume published under `name`.
    pub fn staging_path(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}/staging"))
    }
    /// The CO's target path for the volume published under `name`.
    pub fn target_path(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}/target"))
    }
    /// The pool file that backs a volume.
    pub fn volume_image(&self, volume_id: &str) -> PathBuf {
        self.pool_root()
            .join("berth/volumes")
            .join(format!("{volume_id}.img"))
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("berth.log")).unwrap_or_default()
    }

    async fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("berth.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.arg("all-in-one")
            .arg("--endpoint")
            .arg(self.endpoint())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--node-id")
            .arg(NODE_ID)
            .arg("--pool-size")
            .arg(self.opts.pool_size)
            .args(&self.opts.extra_args)
            .env("RUST_LOG", "info,berth=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(n) = self.opts.max_volumes_per_node {
            cmd.arg("--max-volumes-per-node").arg(n.to_string());
        }
        match &self.opts.failpoint {
            Some(fp) => cmd.env("BERTH_FAILPOINT", fp),
            None => cmd.env_remove("BERTH_FAILPOINT"),
        };
        self.child = Some(cmd.spawn().expect("spawn berth"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("berth exited during start-up ({status}):\n{}", self.log());
            }
            if self.socket().exists() && berth::client::connect(&self.endpoint()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "berth did not start within 60s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to die by itself (e.g. at a failpoint).
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.as_mut().expect("running").try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "berth did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().expect("running").id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.wait_exit(Duration::from_secs(30)).await
    }

    /// Starts the process again on the same state dir (with a new failpoint setting).
    pub async fn restart(&mut self, failpoint: Option<&str>) {
        self.kill9();
        self.opts.failpoint = failpoint.map(str::to_string);
        self.spawn().await;
    }

    pub async fn channel(&self) -> Channel {
        berth::client::connect(&self.endpoint())
            .await
            .expect("connect")
    }
    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }
    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }
    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }
    pub async fn group(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.channel().await)
    }

    /// Loop devices whose backing file is inside this driver's pool (volumes only).
    pub fn volume_loop_devices(&self) -> Vec<String> {
        let out = Command::new("losetup")
            .args(["--list", "--noheadings", "-O", "NAME,BACK-FILE"])
            .output()
            .unwrap();
        let pool = self.pool_root().join("berth");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&*pool.to_string_lossy()))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .collect()
    }

    /// Mounts under the CO's directories of this test (staging and target paths).
    pub fn test_mounts(&self) -> Vec<String> {
        let k8s = self.dir.path().join("k8s");
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&*k8s.to_string_lossy()))
            .collect()
    }

    /// Files in the pool's volume/snapshot/group/tmp directories.
    pub fn pool_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in ["volumes", "snapshots", "groups", "tmp"] {
            if let Ok(rd) = std::fs::read_dir(self.pool_root().join("berth").join(sub)) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
        out.sort();
        out
    }

    /// Asserts nothing of any volume is left: no loop devices, mounts or pool files.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.volume_loop_devices(),
            Vec::<String>::new(),
            "loop devices left"
        );
        assert_eq!(self.test_mounts(), Vec::<String>::new(), "mounts left");
        assert_eq!(self.pool_files(), Vec::<PathBuf>::new(), "pool files left");
        // Deleted images are unlinked in the background; they must not stay.
        let trash = self.pool_root().join("berth").join("trash");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::read_dir(&trash).is_ok_and(|mut d| d.next().is_some()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the trash is not emptied"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill9();
        cleanup_dir(self.dir.path());
    }
}

fn mounts_under(root: &str) -> Vec<String> {
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(root))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts
}

fn detach_loops_under(prefix: &str) {
    if let Ok(out) = Command::new("losetup")
        .args(["--list", "--noheadings", "-O", "NAME,BACK-FILE"])
        .output()
    {
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let mut f = l.split_whitespace();
            if let (Some(dev), Some(back)) = (f.next(), f.next())
                && back.starts_with(prefix)
            {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
    }
}

/// Removes every mount and loop device a test made under `root`, in the only order that
/// works: the CO's mounts, then the volumes' loop devices (while the pool is still mounted,
/// so their backing paths still read as paths under `root`), then the pool mount, then the
/// pool's loop device. Used after a test, whether it passed or not.
pub fn cleanup_dir(root: &Path) {
    let root_s = root.to_string_lossy().to_string();
    let pool = root
        .join("state")
        .join("pool")
        .to_string_lossy()
        .to_string();
    for m in mounts_under(&root_s).into_iter().filter(|m| *m != pool) {
        let _ = Command::new("fsfreeze")
            .args(["-u", &m])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .arg(&m)
            .stderr(Stdio::null())
            .status();
    }
    detach_loops_under(&format!("{pool}/"));
    for m in mounts_under(&root_s) {
        if Command::new("umount")
            .arg(&m)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| !s.success())
        {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
    }
    detach_loops_under(&format!("{root_s}/"));
}

// ---- request builders ----------------------------------------------------------------

pub fn mount_cap(fs_type: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: fs_type.to_string(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn with_mode(
    mut cap: csi::VolumeCapability,
    mode: volume_capability::access_mode::Mode,
) -> csi::VolumeCapability {
    cap.access_mode = Some(volume_capability::AccessMode { mode: mode as i32 });
    cap
}

pub fn create_req(name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub fn from_snapshot(
    mut req: csi::CreateVolumeRequest,
    snapshot_id: &str,
) -> csi::CreateVolumeRequest {
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.to_string(),
            },
        )),
    });
    req
}

pub fn from_volume(mut req: csi::CreateVolumeRequest, volume_id: &str) -> csi::CreateVolumeRequest {
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: volume_id.to_string(),
            },
        )),
    });
    req
}

/// The BLAKE3 hash of everything a file or device holds.
pub fn content_hash(p: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap();
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

pub fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub fn delete_volume_req(id: &str) -> csi::DeleteVolumeRequest {
    csi::DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    }
}

pub fn get_volume_req(id: &str) -> csi::ControllerGetVolumeRequest {
    csi::ControllerGetVolumeRequest {
        volume_id: id.into(),
    }
}

pub fn snapshot_req(name: &str, source_volume_id: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source_volume_id.into(),
        ..Default::default()
    }
}

pub fn delete_snapshot_req(id: &str) -> csi::DeleteSnapshotRequest {
    csi::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    }
}

pub fn group_snapshot_req(
    name: &str,
    source_volume_ids: &[&str],
) -> csi::CreateVolumeGroupSnapshotRequest {
    csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: source_volume_ids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn get_group_snapshot_req(
    id: &str,
    snapshot_ids: &[String],
) -> csi::GetVolumeGroupSnapshotRequest {
    csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: snapshot_ids.to_vec(),
        ..Default::default()
    }
}

pub fn delete_group_snapshot_req(
    id: &str,
    snapshot_ids: &[String],
) -> csi::DeleteVolumeGroupSnapshotRequest {
    csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: snapshot_ids.to_vec(),
        ..Default::default()
    }
}

/// ControllerExpandVolume to `required` bytes (`limit` 0: none), without a capability.
pub fn expand_req(id: &str, required: i64, limit: i64) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    }
}

pub fn stage_req(
    id: &str,
    staging: &Path,
    cap: csi::VolumeCapability,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path_str(staging),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn unstage_req(id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path_str(staging),
    }
}

pub fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: csi::VolumeCapability,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path_str(staging),
        target_path: path_str(target),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

pub fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: path_str(target),
    }
}

// ---- calls that must succeed ---------------------------------------------------------------

/// CreateVolume, which must succeed; returns the (REQUIRED) volume.
pub async fn create_volume(ctl: &Ctl, req: csi::CreateVolumeRequest) -> csi::Volume {
    let name = req.name.clone();
    ctl.clone()
        .create_volume(req)
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e:?}"))
        .into_inner()
        .volume
        .expect("CreateVolumeResponse.volume is REQUIRED")
}

/// CreateSnapshot of `source_volume_id`, which must succeed with a ready snapshot of it.
pub async fn create_snapshot(ctl: &Ctl, name: &str, source_volume_id: &str) -> csi::Snapshot {
    let snap = ctl
        .clone()
        .create_snapshot(snapshot_req(name, source_volume_id))
        .await
        .unwrap_or_else(|e| panic!("CreateSnapshot {name}: {e:?}"))
        .into_inner()
        .snapshot
        .expect("CreateSnapshotResponse.snapshot is REQUIRED");
    assert!(snap.ready_to_use, "CreateSnapshot {name}: not ready_to_use");
    assert_eq!(
        snap.source_volume_id, source_volume_id,
        "CreateSnapshot {name}: source_volume_id"
    );
    snap
}

/// CreateVolumeGroupSnapshot, which must succeed; returns the (REQUIRED) group snapshot.
pub async fn create_group_snapshot(
    grp: &Grp,
    name: &str,
    source_volume_ids: &[&str],
) -> csi::VolumeGroupSnapshot {
    grp.clone()
        .create_volume_group_snapshot(group_snapshot_req(name, source_volume_ids))
        .await
        .unwrap_or_else(|e| panic!("CreateVolumeGroupSnapshot {name}: {e:?}"))
        .into_inner()
        .group_snapshot
        .expect("CreateVolumeGroupSnapshotResponse.group_snapshot is REQUIRED")
}

pub async fn delete_volume(ctl: &Ctl, id: &str) {
    ctl.clone()
        .delete_volume(delete_volume_req(id))
        .await
        .unwrap_or_else(|e| panic!("DeleteVolume {id}: {e:?}"));
}

pub async fn delete_snapshot(ctl: &Ctl, id: &str) {
    ctl.clone()
        .delete_snapshot(delete_snapshot_req(id))
        .await
        .unwrap_or_else(|e| panic!("DeleteSnapshot {id}: {e:?}"));
}

pub async fn get_volume(ctl: &Ctl, id: &str) -> csi::ControllerGetVolumeResponse {
    ctl.clone()
        .controller_get_volume(get_volume_req(id))
        .await
        .unwrap_or_else(|e| panic!("ControllerGetVolume {id}: {e:?}"))
        .into_inner()
}

/// Every volume entry, from one unpaginated ListVolumes.
pub async fn list_volumes(ctl: &Ctl) -> Vec<csi::list_volumes_response::Entry> {
    let r = ctl
        .clone()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .expect("ListVolumes")
        .into_inner();
    assert!(r.next_token.is_empty(), "max_entries 0 lists everything");
    r.entries
}

/// Every volume id, from one unpaginated ListVolumes.
pub async fn list_volume_ids(ctl: &Ctl) -> Vec<String> {
    list_volumes(ctl)
        .await
        .into_iter()
        .map(|e| e.volume.expect("entry.volume").volume_id)
        .collect()
}

/// Every snapshot id, from one unpaginated ListSnapshots.
pub async fn list_snapshot_ids(ctl: &Ctl) -> Vec<String> {
    let r = ctl
        .clone()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .expect("ListSnapshots")
        .into_inner();
    assert!(r.next_token.is_empty(), "max_entries 0 lists everything");
    r.entries
        .into_iter()
        .map(|e| e.snapshot.expect("entry.snapshot").snapshot_id)
        .collect()
}

/// A volume staged and published as the kubelet would do it (at `d.staging_path(name)` and
/// `d.target_path(name)`); returns the target path.
pub async fn stage_and_publish(
    d: &Driver,
    volume_id: &str,
    cap: &csi::VolumeCapability,
    name: &str,
) -> PathBuf {
    d.node()
        .await
        .node_stage_volume(stage_req(volume_id, &d.staging_path(name), cap.clone()))
        .await
        .unwrap_or_else(|e| panic!("NodeStageVolume {name}: {e:?}"));
    publish(d, volume_id, cap, name).await
}

/// NodePublishVolume (read-write) of a volume staged at `d.staging_path(name)`; returns the
/// target path.
pub async fn publish(
    d: &Driver,
    volume_id: &str,
    cap: &csi::VolumeCapability,
    name: &str,
) -> PathBuf {
    let target = d.target_path(name);
    d.node()
        .await
        .node_publish_volume(publish_req(
            volume_id,
            &d.staging_path(name),
            &target,
            cap.clone(),
            false,
        ))
        .await
        .unwrap_or_else(|e| panic!("NodePublishVolume {name}: {e:?}"));
    target
}

pub async fn unpublish_and_unstage(d: &Driver, volume_id: &str, name: &str) {
    let mut node = d.node().await;
    node.node_unpublish_volume(unpublish_req(volume_id, &d.target_path(name)))
        .await
        .unwrap_or_else(|e| panic!("NodeUnpublishVolume {name}: {e:?}"));
    node.node_unstage_volume(unstage_req(volume_id, &d.staging_path(name)))
        .await
        .unwrap_or_else(|e| panic!("NodeUnstageVolume {name}: {e:?}"));
}

// ---- observations --------------------------------------------------------------------------

/// Total size of the filesystem mounted at `path`, per statvfs.
pub fn fs_total_bytes(path: &Path) -> u64 {
    let st =
        rustix::fs::statvfs(path).unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    st.f_blocks * st.f_frsize
}

/// How many mounts are stacked at `p` (a repeated publish must not add one).
pub fn mount_count(p: &Path) -> usize {
    let p = path_str(p);
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(p.as_str()))
        .count()
}

pub fn is_mounted(p: &Path) -> bool {
    mount_count(p) > 0
}

/// Writes pattern(seed, len) to `path` (fsynced) on a thread; the receiver gets a message
/// when the write completed (a write to a frozen filesystem blocks until it is thawed).
pub fn spawn_write(path: PathBuf, seed: u64, len: usize) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        write_pattern(&path, seed, len);
        let _ = tx.send(());
    });
    rx
}

/// Whether a write + fsync of pattern(seed, len) to `path` finishes within `within`.
pub fn write_within(path: PathBuf, seed: u64, len: usize, within: Duration) -> bool {
    spawn_write(path, seed, len).recv_timeout(within).is_ok()
}

/// Fails unless a write + fsync of pattern(seed, len) to `path` finishes within 15s: a
/// write to a filesystem left frozen blocks until it is thawed.
pub async fn write_promptly(path: PathBuf, seed: u64, len: usize) {
    let rx = spawn_write(path.clone(), seed, len);
    tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(15)))
        .await
        .unwrap()
        .unwrap_or_else(|_| {
            panic!(
                "a write to {} did not finish within 15s: is the filesystem still frozen?",
                path.display()
            )
        });
}

pub fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Writes a deterministic pattern (seeded) of `len` bytes to `path` and fsyncs it.
pub fn write_pattern(path: &Path, seed: u64, len: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&pattern(seed, len)).unwrap();
    f.sync_all().unwrap();
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
