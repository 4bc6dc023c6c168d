//! berth-bench: measures a real `berth all-in-one` process over its CSI socket, each figure
//! side by side with a named baseline, and prints Markdown tables for docs/BENCHMARKS.md.
//!
//! Every section starts its own berth on a fresh state dir under a temp dir, runs `--runs`
//! rounds in which berth and the baseline alternate (berth first in even rounds, baseline
//! first in odd ones, so machine noise hits both), and reports:
//! - "median": the median over rounds of each round's figure (a round's median when a round
//!   has several samples);
//! - "p99": the 99th percentile (nearest rank) of all samples of all rounds pooled; with one
//!   sample per round that is the worst round.
//!
//! Section 7 (`--only move`) starts a two-node cluster instead (src/bin/bench/move.rs),
//! section 8 (`--only scale`) clusters of 2 to 16 nodes (src/bin/bench/scale.rs), and
//! section 9 (`--only failover`) a fresh two-node cluster per run (src/bin/bench/failover.rs).
//!
//! Tables go to stdout, progress to stderr: `berth-bench > results.md`. Needs root (berth
//! attaches loop devices and mounts), fio, filefrag, xfs_io and coreutils. Everything the
//! bench mounted or attached is undone and its temp dir removed, also after an error or
//! Ctrl-C.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command as StdCommand, Stdio},
    time::{Duration, Instant},
};

use berth::proto::csi::v1 as csi;
use clap::{Parser, ValueEnum};
use csi::{
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient,
    volume_capability,
};
use tokio::process::Command;
use tonic::transport::Channel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, BoxError>;

macro_rules! bail {
    ($($t:tt)*) => { return Err(format!($($t)*).into()) };
}

/// Progress and diagnostics: stderr, so stdout holds only the Markdown report.
macro_rules! note {
    ($($t:tt)*) => { eprintln!("[berth-bench] {}", format!($($t)*)) };
}

// After the macros: a module sees only the macros defined above its declaration.
#[path = "bench/failover.rs"]
mod failover_section;
#[path = "bench/move.rs"]
mod move_section;
#[path = "bench/scale.rs"]
mod scale_section;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const NODE_ID: &str = "bench-node";

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Benchmarks a real berth all-in-one process against named baselines; prints Markdown",
    long_about = None
)]
struct Cli {
    /// The berth binary (default: `berth` next to this executable).
    #[arg(long)]
    berth: Option<PathBuf>,
    /// Rounds per measurement; every reported figure is the median over rounds.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Run only these sections (comma-separated or repeated). Default: all, in order.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Size of each berth's embedded pool image (sparse).
    #[arg(long, default_value = "32Gi")]
    pool_size: String,
    /// Where the bench's temp dir goes (default: $TMPDIR or /tmp). It holds multi-GiB sparse
    /// images while it runs and is removed at the end.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// rpc: concurrent clients, each on its own channel.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// rpc: CreateVolume+DeleteVolume pairs per client per round.
    #[arg(long, default_value_t = 25)]
    ops_per_client: usize,
    /// rpc: idle 1 MiB volumes created before measuring, to show how CreateVolume scales
    /// with the number of volumes in the pool.
    #[arg(long, default_value_t = 0)]
    idle_volumes: usize,
    /// stage: stage+publish+unpublish+unstage cycles per volume kind per round.
    #[arg(long, default_value_t = 20)]
    cycles: usize,
    /// memory: RPCs sent to each fresh process before its RSS is read again.
    #[arg(long, default_value_t = 400)]
    rpcs: usize,
    /// snapshot: also measure an empty 4 GiB volume fragmented by 1 GiB of random 4 KiB
    /// writes (allocation fragmentation rather than copy-on-write fragmentation).
    #[arg(long)]
    with_sparse_frag: bool,
    /// fio: seconds per job.
    #[arg(long, default_value_t = 10)]
    fio_runtime: u32,
    /// fio: size of the test file on each side, MiB.
    #[arg(long, default_value_t = 1024)]
    fio_size_mib: u64,
    /// fio: I/O engine (libaio or io_uring).
    #[arg(long, default_value = "libaio")]
    fio_engine: String,
    /// move: size of each node's embedded pool image (sparse); must hold the big volume.
    #[arg(long, default_value = "96Gi")]
    move_pool_size: String,
    /// move: size of the pre-warmed and stop-and-copy volumes, GiB.
    #[arg(long, default_value_t = 8)]
    move_volume_gib: u64,
    /// move: size of the big pre-warmed volume (same data, same changes), GiB.
    #[arg(long, default_value_t = 64)]
    move_big_volume_gib: u64,
    /// move: data written before the pre-warm, GiB.
    #[arg(long, default_value_t = 2)]
    move_data_gib: u64,
    /// move: data changed after the pre-warm, before the cut-over, MiB.
    #[arg(long, default_value_t = 64)]
    move_change_mib: u64,
    /// move: sizes of the fully written volumes moved without a replica, GiB.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    move_full_gib: Vec<u64>,
    /// move: rounds of the full moves (default: --runs).
    #[arg(long)]
    move_full_runs: Option<usize>,
    /// move: rounds of the largest full move (default: --move-full-runs), to keep the
    /// section's time in bounds.
    #[arg(long)]
    move_largest_full_runs: Option<usize>,
    /// move: copy the controller's and nodes' logs into this directory before cleaning up.
    #[arg(long)]
    move_keep_logs: Option<PathBuf>,
    /// scale: node counts, one cluster each (the last node of each is the one stopped).
    #[arg(long, value_delimiter = ',', default_value = "2,8,16")]
    scale_nodes: Vec<usize>,
    /// scale: size of each node's embedded pool image (sparse; 512Mi is berth's minimum).
    #[arg(long, default_value = "512Mi")]
    scale_pool_size: String,
    /// scale: CreateVolume (and then ControllerPublishVolume) calls per round, all nodes up.
    #[arg(long, default_value_t = 40)]
    scale_volumes: usize,
    /// scale: CreateVolume and ControllerPublishVolume calls per round with one node stopped.
    #[arg(long, default_value_t = 20)]
    scale_stopped_volumes: usize,
    /// scale: client deadline of each CSI call; a call past it counts as an error.
    #[arg(long, default_value_t = 30)]
    scale_deadline_secs: u64,
    /// scale: wait after stopping the node, before measuring.
    #[arg(long, default_value_t = 15)]
    scale_settle_secs: u64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    /// 1. CreateVolume+DeleteVolume throughput and latency, concurrent clients.
    Rpc,
    /// 2+3. CreateSnapshot and restore (CreateVolume from snapshot) vs a full copy.
    #[value(alias = "restore")]
    Snapshot,
    /// 4. Stage+publish+unpublish+unstage cycles (ext4 and block).
    Stage,
    /// 5. Start-up time and resident memory.
    #[value(alias = "startup")]
    Memory,
    /// 6. fio on a published volume vs the pool filesystem.
    Fio,
    /// 7. Moving volumes between the nodes of a two-node cluster.
    Move,
    /// 8. Cost of a CSI call by cluster size (2-16 nodes), and one stopped node.
    Scale,
    /// 9. SIGKILL of a replicated volume's node to publish + stage on another.
    Failover,
}

impl Section {
    const ALL: [Section; 8] = [
        Section::Rpc,
        Section::Snapshot,
        Section::Stage,
        Section::Memory,
        Section::Fio,
        Section::Move,
        Section::Scale,
        Section::Failover,
    ];
    fn name(self) -> &'static str {
        match self {
            Section::Rpc => "rpc",
            Section::Snapshot => "snapshot",
            Section::Stage => "stage",
            Section::Memory => "memory",
            Section::Fio => "fio",
            Section::Move => "move",
            Section::Scale => "scale",
            Section::Failover => "failover",
        }
    }
}

/// What every section needs: the parsed flags plus resolved paths.
struct Cfg {
    cli: Cli,
    berth: PathBuf,
    root: PathBuf,
}

// ---- statistics --------------------------------------------------------------------------

fn sorted(xs: &[f64]) -> Vec<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn median(xs: &[f64]) -> f64 {
    let v = sorted(xs);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile.
fn percentile(xs: &[f64], p: f64) -> f64 {
    let v = sorted(xs);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// One measured quantity: per-round figures plus every raw sample.
#[derive(Debug, Default, Clone)]
struct Series {
    per_run: Vec<f64>,
    all: Vec<f64>,
}

impl Series {
    fn push_round(&mut self, samples: &[f64]) {
        if !samples.is_empty() {
            self.per_run.push(median(samples));
            self.all.extend_from_slice(samples);
        }
    }
    fn push(&mut self, x: f64) {
        self.push_round(&[x]);
    }
    fn median(&self) -> f64 {
        median(&self.per_run)
    }
    fn p99(&self) -> f64 {
        percentile(&self.all, 99.0)
    }
}

fn fmt_secs(s: f64) -> String {
    if s.is_nan() {
        "—".into()
    } else if s >= 10.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.01 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

fn fmt_ratio(r: f64) -> String {
    if r.is_nan() || r.is_infinite() {
        "—".into()
    } else if r >= 10.0 {
        format!("{r:.0}×")
    } else if r >= 0.1 {
        format!("{r:.2}×")
    } else {
        format!("{r:.4}×")
    }
}

fn yes_no(ok: bool) -> String {
    if ok { "yes".into() } else { "**no**".into() }
}

struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }
    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    fn print(&self) {
        let mut out = String::new();
        out.push_str(&format!("| {} |\n", self.headers.join(" | ")));
        out.push_str(&format!(
            "|{}|\n",
            self.headers
                .iter()
                .map(|_| "---")
                .collect::<Vec<_>>()
                .join("|")
        ));
        for r in &self.rows {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        say(&out);
    }
}

/// Report text (stdout), flushed at once so a section's table is there even if a later one
/// fails.
fn say(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}");
    let _ = o.flush();
}

/// Berth first in even rounds, the baseline first in odd ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Berth,
    Baseline,
}

fn order(round: usize) -> [Side; 2] {
    if round.is_multiple_of(2) {
        [Side::Berth, Side::Baseline]
    } else {
        [Side::Baseline, Side::Berth]
    }
}

// ---- system helpers ----------------------------------------------------------------------

/// Runs a command to completion (killed if the bench is interrupted); stdout on success.
async fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn p(path: &Path) -> &str {
    path.to_str().expect("bench paths are UTF-8")
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn mount_points_under(root: &Path) -> Vec<PathBuf> {
    berth::util::fsutil::mounts()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(root))
        .collect()
}

/// (device, backing file) of every loop device whose backing file is under `root`.
fn loops_under(root: &Path) -> Vec<(String, PathBuf)> {
    let Ok(out) = StdCommand::new("losetup")
        .args(["--list", "--json", "-O", "NAME,BACK-FILE"])
        .output()
    else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["loopdevices"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    let name = e["name"].as_str()?.to_string();
                    let back = e["back-file"].as_str()?;
                    let back = PathBuf::from(back.strip_suffix(" (deleted)").unwrap_or(back));
                    back.starts_with(root).then_some((name, back))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn umount(path: &Path) {
    use nix::mount::{MntFlags, umount2};
    let _ = StdCommand::new("fsfreeze")
        .args(["-u", p(path)])
        .stderr(Stdio::null())
        .status();
    // A tool killed by an interrupt (fio on a published volume) may take a moment to exit
    // and release the mount.
    for _ in 0..50 {
        match umount2(path, MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return,
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    note!(
        "{} still busy after 5 s; detaching it lazily",
        path.display()
    );
    let _ = umount2(path, MntFlags::MNT_DETACH);
}

fn detach(dev: &str) {
    let _ = StdCommand::new("losetup")
        .args(["-d", dev])
        .stderr(Stdio::null())
        .status();
}

/// Undoes everything under `root`: mounts of the CO's paths, then the volumes' loop devices
/// (their images live in a pool under `root`; detached while the pool is still mounted, so
/// their backing paths are still recognisable), then the pools and their loop devices, then
/// the files. Never touches a mount or loop device outside `root`.
fn cleanup_tree(root: &Path) {
    if !root.exists() {
        return;
    }
    let is_pool = |m: &Path| m.ends_with("state/pool");
    let mut mounts: Vec<PathBuf> = mount_points_under(root)
        .into_iter()
        .filter(|m| !is_pool(m))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in &mounts {
        umount(m);
    }
    for (dev, back) in loops_under(root) {
        if back.file_name().is_none_or(|n| n != "pool.img") {
            detach(&dev);
        }
    }
    for m in mount_points_under(root) {
        umount(&m);
    }
    for (dev, _) in loops_under(root) {
        detach(&dev);
    }
    if let Err(e) = fs::remove_dir_all(root) {
        note!("could not remove {}: {e}", root.display());
    }
}

/// Drops the page cache of a (clean) file, so a baseline copy reads from the device as a
/// volume written with direct I/O would be.
fn drop_cache(path: &Path) -> Result<()> {
    let f = File::open(path)?;
    f.sync_all()?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

/// (extents as `filefrag` counts them, XFS mapping records as `xfs_io -c stat` reports).
/// filefrag merges physically contiguous ranges even when XFS keeps them as separate
/// written/unwritten records; FICLONE pays per record.
async fn extents(path: &Path) -> Result<(u64, u64)> {
    let ff = run("filefrag", &[p(path)]).await?;
    let n_ff = ff
        .rsplit(':')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected filefrag output {ff:?}"))?;
    let st = run("xfs_io", &["-r", "-c", "stat", p(path)]).await?;
    let n_x = st
        .lines()
        .find_map(|l| l.trim().strip_prefix("fsxattr.nextents = "))
        .and_then(|s| s.trim().parse().ok())
        .ok_or("no fsxattr.nextents in xfs_io stat output")?;
    Ok((n_ff, n_x))
}

/// Waits until XFS has finished the work it defers after deletes: an unlinked file's
/// extents are freed later by background inode inactivation, which syncfs(2) does not wait
/// for but a freeze does (it drains that work first). Returns how long that took.
async fn settle(pool: &Path) -> Result<f64> {
    let t = Instant::now();
    run("fsfreeze", &["-f", p(pool)]).await?;
    run("fsfreeze", &["-u", p(pool)]).await?;
    Ok(t.elapsed().as_secs_f64())
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

// ---- the berth process -------------------------------------------------------------------

/// One `berth all-in-one` on its own state dir, socket and pool, under `dir`.
struct Driver {
    dir: PathBuf,
    berth: PathBuf,
    pool_size: String,
    child: Option<Child>,
}

impl Driver {
    async fn start(cfg: &Cfg, name: &str) -> Result<Driver> {
        let dir = cfg.root.join(name);
        fs::create_dir_all(&dir)?;
        let mut d = Driver {
            dir,
            berth: cfg.berth.clone(),
            pool_size: cfg.cli.pool_size.clone(),
            child: None,
        };
        d.spawn().await?;
        Ok(d)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("csi.sock")
    }
    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    fn pool_root(&self) -> PathBuf {
        self.state_dir().join("pool")
    }
    /// A CO directory (staging or target path) under this driver's dir.
    fn co_path(&self, name: &str) -> PathBuf {
        self.dir.join("k8s").join(name)
    }
    fn volume_image(&self, volume_id: &str) -> PathBuf {
        self.pool_root()
            .join("berth/volumes")
            .join(format!("{volume_id}.img"))
    }
    fn log_tail(&self) -> String {
        tail(&self.dir.join("berth.log"))
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Starts berth (on whatever the state dir holds) and returns the time from spawn until
    /// the socket answers Probe.
    async fn spawn(&mut self) -> Result<Duration> {
        let _ = fs::remove_file(self.socket());
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("berth.log"))?;
        let started = Instant::now();
        let child = StdCommand::new(&self.berth)
            .arg("all-in-one")
            .arg("--endpoint")
            .arg(self.endpoint())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--node-id")
            .arg(NODE_ID)
            .arg("--pool-size")
            .arg(&self.pool_size)
            // berth's defaults (info logging), whatever the caller's environment says.
            .env_remove("RUST_LOG")
            .env_remove("CSI_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.berth.display()))?;
        self.child = Some(child);
        let deadline = started + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().expect("just spawned").try_wait()? {
                self.child = None;
                bail!(
                    "berth exited during start-up ({status}):\n{}",
                    self.log_tail()
                );
            }
            if self.socket().exists()
                && let Ok(ch) = berth::client::connect(&self.endpoint()).await
                && IdentityClient::new(ch)
                    .probe(csi::ProbeRequest {})
                    .await
                    .is_ok()
            {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "berth did not answer Probe within 60 s:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// SIGTERM and wait for the graceful exit.
    async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("berth did not stop within 30 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// (VmRSS, VmHWM) in bytes.
    fn memory(&self) -> Result<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .map(|kib| kib * 1024)
                .ok_or_else(|| format!("no {k} in /proc/PID/status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    async fn channel(&self) -> Result<Channel> {
        berth::client::connect(&self.endpoint()).await
    }
    async fn controller(&self) -> Result<ControllerClient<Channel>> {
        Ok(ControllerClient::new(self.channel().await?))
    }
    async fn node(&self) -> Result<NodeClient<Channel>> {
        Ok(NodeClient::new(self.channel().await?))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        stop_child(&mut self.child);
        cleanup_tree(&self.dir);
    }
}

/// SIGTERM, up to 10 s to drain, then SIGKILL.
fn stop_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The last 20 lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let log = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

// ---- CSI requests ------------------------------------------------------------------------

fn mount_cap(fs_type: &str) -> csi::VolumeCapability {
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

fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create_req(name: &str, bytes: u64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

fn from_snapshot(mut req: csi::CreateVolumeRequest, snapshot_id: &str) -> csi::CreateVolumeRequest {
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.to_string(),
            },
        )),
    });
    req
}

async fn create_volume(
    ctl: &mut ControllerClient<Channel>,
    req: csi::CreateVolumeRequest,
) -> Result<String> {
    let name = req.name.clone();
    let v = ctl
        .create_volume(req)
        .await
        .map_err(|e| format!("CreateVolume {name}: {e}"))?
        .into_inner()
        .volume
        .ok_or("CreateVolume returned no volume")?;
    Ok(v.volume_id)
}

async fn delete_volume(ctl: &mut ControllerClient<Channel>, volume_id: &str) -> Result<()> {
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: volume_id.to_string(),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("DeleteVolume {volume_id}: {e}"))?;
    Ok(())
}

async fn create_snapshot(
    ctl: &mut ControllerClient<Channel>,
    volume_id: &str,
    name: &str,
) -> Result<String> {
    let s = ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: volume_id.to_string(),
            name: name.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("CreateSnapshot {name}: {e}"))?
        .into_inner()
        .snapshot
        .ok_or("CreateSnapshot returned no snapshot")?;
    Ok(s.snapshot_id)
}

async fn delete_snapshot(ctl: &mut ControllerClient<Channel>, snapshot_id: &str) -> Result<()> {
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snapshot_id.to_string(),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("DeleteSnapshot {snapshot_id}: {e}"))?;
    Ok(())
}

/// Latencies of the four node RPCs of one cycle.
#[derive(Debug, Default, Clone, Copy)]
struct CycleTimes {
    stage: f64,
    publish: f64,
    unpublish: f64,
    unstage: f64,
}

impl CycleTimes {
    fn total(&self) -> f64 {
        self.stage + self.publish + self.unpublish + self.unstage
    }
}

fn staging_and_target(d: &Driver, name: &str) -> (String, String) {
    (
        p(&d.co_path(&format!("{name}/staging"))).to_string(),
        p(&d.co_path(&format!("{name}/target"))).to_string(),
    )
}

/// NodeStage + NodePublish as the kubelet does it; returns the target path.
async fn stage_publish(
    node: &mut NodeClient<Channel>,
    d: &Driver,
    volume_id: &str,
    cap: &csi::VolumeCapability,
    name: &str,
) -> Result<(PathBuf, f64, f64)> {
    let (staging, target) = staging_and_target(d, name);
    let t = Instant::now();
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("NodeStageVolume {volume_id}: {e}"))?;
    let stage = t.elapsed().as_secs_f64();
    let t = Instant::now();
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: staging,
        target_path: target.clone(),
        volume_capability: Some(cap.clone()),
        readonly: false,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("NodePublishVolume {volume_id}: {e}"))?;
    Ok((PathBuf::from(target), stage, t.elapsed().as_secs_f64()))
}

async fn unpublish_unstage(
    node: &mut NodeClient<Channel>,
    d: &Driver,
    volume_id: &str,
    name: &str,
) -> Result<(f64, f64)> {
    let (staging, target) = staging_and_target(d, name);
    let t = Instant::now();
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: volume_id.to_string(),
        target_path: target,
    })
    .await
    .map_err(|e| format!("NodeUnpublishVolume {volume_id}: {e}"))?;
    let unpublish = t.elapsed().as_secs_f64();
    let t = Instant::now();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: staging,
    })
    .await
    .map_err(|e| format!("NodeUnstageVolume {volume_id}: {e}"))?;
    Ok((unpublish, t.elapsed().as_secs_f64()))
}

async fn berth_cycle(
    node: &mut NodeClient<Channel>,
    d: &Driver,
    volume_id: &str,
    cap: &csi::VolumeCapability,
    name: &str,
) -> Result<CycleTimes> {
    let (_, stage, publish) = stage_publish(node, d, volume_id, cap, name).await?;
    let (unpublish, unstage) = unpublish_unstage(node, d, volume_id, name).await?;
    Ok(CycleTimes {
        stage,
        publish,
        unpublish,
        unstage,
    })
}

// ---- fio ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct FioResult {
    iops: f64,
    bw_mib: f64,
    clat_p99: f64,
    clat_p999: f64,
    clat_max: f64,
    /// Share of all CPUs busy (not idle, not iowait) machine-wide while fio ran.
    cpu_busy: f64,
}

/// (busy, total) jiffies of all CPUs since boot, from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Runs fio with `--output-format=json` and reads the `dir` ("read"/"write") figures of its
/// single job.
async fn fio(args: &[String], dir: &str) -> Result<FioResult> {
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.push("--output-format=json");
    let before = cpu_jiffies();
    let out = run("fio", &a).await?;
    let after = cpu_jiffies();
    // fio may print notices before the JSON document.
    let json = &out[out.find('{').ok_or("no JSON in fio output")?..];
    let v: serde_json::Value = serde_json::from_str(json)?;
    let job = &v["jobs"][0][dir];
    let num = |x: &serde_json::Value| x.as_f64().ok_or_else(|| format!("fio JSON: {x}"));
    Ok(FioResult {
        iops: num(&job["iops"])?,
        bw_mib: num(&job["bw_bytes"])? / MIB as f64,
        clat_p99: num(&job["clat_ns"]["percentile"]["99.000000"])? / 1e9,
        clat_p999: num(&job["clat_ns"]["percentile"]["99.900000"])? / 1e9,
        clat_max: num(&job["clat_ns"]["max"])? / 1e9,
        cpu_busy: (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64,
    })
}

fn fio_args(file: &Path, extra: &[String]) -> Vec<String> {
    let mut a = vec![
        "--name=bench".to_string(),
        format!("--filename={}", p(file)),
        "--direct=1".into(),
        "--numjobs=1".into(),
        "--group_reporting".into(),
    ];
    a.extend_from_slice(extra);
    a
}

// ---- report header -----------------------------------------------------------------------

async fn machine_summary(cfg: &Cfg) -> String {
    let uname = run("uname", &["-srm"]).await.unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let fio = run("fio", &["--version"]).await.unwrap_or_default();
    let berth_version = run(p(&cfg.berth), &["--version"]).await.unwrap_or_default();
    format!(
        "- kernel: `{}`, {cores} cores ({cpu}), {mem} RAM\n- {} (`{}`), {}\n- workdir: `{}` (pool: sparse {} image per berth process; {} per node in the move section)\n- load average at start: {}",
        uname.trim(),
        berth_version.trim(),
        cfg.berth.display(),
        fio.trim(),
        cfg.root.display(),
        cfg.cli.pool_size,
        cfg.cli.move_pool_size,
        loadavg()
    )
}

/// The command that reruns one section alone with the same flags.
fn section_command(section: Section) -> String {
    let mut args: Vec<String> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--only" {
            it.next();
        } else if !a.starts_with("--only=") {
            args.push(a);
        }
    }
    let exe = std::env::args()
        .next()
        .unwrap_or_else(|| "berth-bench".into());
    let mut cmd = format!("{exe} --only {}", section.name());
    for a in args {
        cmd.push(' ');
        cmd.push_str(&a);
    }
    cmd
}

fn section_header(title: &str, section: Section) {
    say(&format!(
        "## {title}\n\nCommand: `{}`  \nLoad average (1/5/15 min) before the section: {}\n",
        section_command(section),
        loadavg()
    ));
}

// ---- 1. CreateVolume + DeleteVolume ------------------------------------------------------

struct Round {
    wall: f64,
    create: Vec<f64>,
    delete: Vec<f64>,
}

async fn rpc_round(d: &Driver, clients: usize, ops: usize, tag: &str) -> Result<Round> {
    let mut chans = Vec::with_capacity(clients);
    for _ in 0..clients {
        chans.push(d.channel().await?);
    }
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (c, ch) in chans.into_iter().enumerate() {
        let tag = tag.to_string();
        set.spawn(async move {
            let mut ctl = ControllerClient::new(ch);
            let (mut cr, mut de) = (Vec::with_capacity(ops), Vec::with_capacity(ops));
            for i in 0..ops {
                let t = Instant::now();
                let id = create_volume(
                    &mut ctl,
                    create_req(&format!("rpc-{tag}-{c}-{i}"), GIB, block_cap()),
                )
                .await?;
                cr.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                delete_volume(&mut ctl, &id).await?;
                de.push(t.elapsed().as_secs_f64());
            }
            Ok::<_, BoxError>((cr, de))
        });
    }
    let mut r = Round {
        wall: 0.0,
        create: Vec::new(),
        delete: Vec::new(),
    };
    while let Some(res) = set.join_next().await {
        let (cr, de) = res??;
        r.create.extend(cr);
        r.delete.extend(de);
    }
    r.wall = start.elapsed().as_secs_f64();
    Ok(r)
}

/// The baseline: the image file alone, made and removed as durably as berth makes it, by
/// as many threads, on the same pool filesystem.
async fn file_round(dir: &Path, threads: usize, ops: usize, tag: &str) -> Result<Round> {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for c in 0..threads {
        let dir = dir.to_owned();
        let tag = tag.to_string();
        set.spawn_blocking(move || -> Result<(Vec<f64>, Vec<f64>)> {
            let (mut cr, mut de) = (Vec::with_capacity(ops), Vec::with_capacity(ops));
            let vols = dir.join("vol");
            for i in 0..ops {
                let name = format!("{tag}-{c}-{i}.img");
                let (tmp, dst) = (dir.join("tmp").join(&name), vols.join(&name));
                let t = Instant::now();
                let f = File::create_new(&tmp)?;
                f.set_len(GIB)?;
                f.sync_all()?;
                drop(f);
                fs::rename(&tmp, &dst)?;
                File::open(&vols)?.sync_all()?;
                cr.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                fs::remove_file(&dst)?;
                File::open(&vols)?.sync_all()?;
                de.push(t.elapsed().as_secs_f64());
            }
            Ok((cr, de))
        });
    }
    let mut r = Round {
        wall: 0.0,
        create: Vec::new(),
        delete: Vec::new(),
    };
    while let Some(res) = set.join_next().await {
        let (cr, de) = res??;
        r.create.extend(cr);
        r.delete.extend(de);
    }
    r.wall = start.elapsed().as_secs_f64();
    Ok(r)
}

#[derive(Default)]
struct RpcStats {
    pairs_per_s: Series,
    create: Series,
    delete: Series,
}

impl RpcStats {
    fn add(&mut self, r: &Round) {
        self.pairs_per_s.push(r.create.len() as f64 / r.wall);
        self.create.push_round(&r.create);
        self.delete.push_round(&r.delete);
    }
}

async fn bench_rpc(cfg: &Cfg) -> Result<()> {
    let (clients, ops) = (cfg.cli.clients, cfg.cli.ops_per_client);
    section_header(
        &format!("1. CreateVolume + DeleteVolume, {clients} concurrent clients"),
        Section::Rpc,
    );
    let d = Driver::start(cfg, "rpc").await?;
    let base = d.pool_root().join("bench-rpc");
    fs::create_dir_all(base.join("tmp"))?;
    fs::create_dir_all(base.join("vol"))?;
    if cfg.cli.idle_volumes > 0 {
        let mut ctl = d.controller().await?;
        for i in 0..cfg.cli.idle_volumes {
            create_volume(&mut ctl, create_req(&format!("idle-{i}"), MIB, block_cap())).await?;
        }
        note!("created {} idle volumes", cfg.cli.idle_volumes);
    }
    // Warm-up, not measured: connections, first records, allocator.
    rpc_round(&d, clients, 2, "warm").await?;
    file_round(&base, clients, 2, "warm").await?;
    let (mut b, mut f) = (RpcStats::default(), RpcStats::default());
    for round in 0..cfg.cli.runs {
        for side in order(round) {
            match side {
                Side::Berth => b.add(&rpc_round(&d, clients, ops, &format!("r{round}")).await?),
                Side::Baseline => {
                    f.add(&file_round(&base, clients, ops, &format!("r{round}")).await?)
                }
            }
        }
        note!(
            "rpc round {}/{}: berth {:.0} pairs/s, baseline {:.0} pairs/s",
            round + 1,
            cfg.cli.runs,
            b.pairs_per_s.per_run.last().unwrap_or(&0.0),
            f.pairs_per_s.per_run.last().unwrap_or(&0.0)
        );
    }
    let mut t = Table::new(&[
        "measurement",
        "berth median",
        "berth p99",
        "baseline median",
        "baseline p99",
        "berth / baseline",
        "target",
        "met?",
    ]);
    let rate = |s: &Series| format!("{:.0}/s", s.median());
    t.row(vec![
        "throughput (create+delete pairs/s)".into(),
        rate(&b.pairs_per_s),
        "—".into(),
        rate(&f.pairs_per_s),
        "—".into(),
        fmt_ratio(b.pairs_per_s.median() / f.pairs_per_s.median()),
        "—".into(),
        "—".into(),
    ]);
    t.row(vec![
        "throughput (RPCs/s)".into(),
        format!("{:.0}/s", 2.0 * b.pairs_per_s.median()),
        "—".into(),
        format!("{:.0}/s", 2.0 * f.pairs_per_s.median()),
        "—".into(),
        fmt_ratio(b.pairs_per_s.median() / f.pairs_per_s.median()),
        "—".into(),
        "—".into(),
    ]);
    for (name, bs, fs_) in [
        ("CreateVolume latency (p50)", &b.create, &f.create),
        ("DeleteVolume latency (p50)", &b.delete, &f.delete),
    ] {
        t.row(vec![
            name.into(),
            fmt_secs(bs.median()),
            fmt_secs(bs.p99()),
            fmt_secs(fs_.median()),
            fmt_secs(fs_.p99()),
            fmt_ratio(bs.median() / fs_.median()),
            "—".into(),
            "—".into(),
        ]);
    }
    t.print();
    say(&format!(
        "{} rounds × {clients} clients × {ops} pairs (1 GiB block volumes, each client on its own gRPC channel). \
         Baseline: the image file alone on the same pool filesystem with {clients} threads — create in a tmp dir, \
         truncate to 1 GiB, fsync, rename, fsync dir; unlink, fsync dir. p50 = median of the rounds' medians; \
         p99 pooled over all rounds. Other volumes in the pool meanwhile: {}.\n",
        cfg.cli.runs, cfg.cli.idle_volumes
    ));
    drop(d);
    Ok(())
}

// ---- 2 + 3. Snapshots and restores -------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// This many bytes written sequentially (1 MiB direct writes) from offset 0.
    Seq(u64),
    /// 4 GiB written sequentially, a snapshot taken, then 1 GiB of random 4 KiB direct
    /// writes (copy-on-write against the snapshot, which is deleted before measuring).
    FragCow,
    /// An empty 4 GiB volume given 1 GiB of random 4 KiB direct writes.
    FragSparse,
}

struct Case {
    key: &'static str,
    label: &'static str,
    fill: Fill,
}

struct CaseResult {
    label: &'static str,
    fill: Fill,
    snapshot: Series,
    restore: Series,
    copy: Series,
    delete_snapshot: Series,
    /// Freeze+thaw of the pool after the deletes: the extent freeing XFS defers to later.
    deferred_free: Series,
    delete_restored: Series,
    extents: (u64, u64),
    allocated: u64,
    fill_secs: f64,
    /// (CreateSnapshot latency, longest write, fio p99.9) with a writer on the volume.
    stall: (f64, f64, f64),
}

/// CreateSnapshot while the volume is attached and a 4 KiB QD1 random writer runs on it: the
/// longest single write shows how long the volume's I/O was held up by the snapshot.
async fn snapshot_stall(
    cfg: &Cfg,
    d: &Driver,
    ctl: &mut ControllerClient<Channel>,
    volume_id: &str,
    key: &str,
    expect_secs: f64,
    region: u64,
) -> Result<(f64, f64, f64)> {
    let mut node = d.node().await?;
    let name = format!("{key}-stall");
    let (target, _, _) = stage_publish(&mut node, d, volume_id, &block_cap(), &name).await?;
    let runtime = (4.0 + 1.5 * expect_secs).ceil() as u64;
    let args = fio_args(
        &target,
        &[
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=1".into(),
            format!("--size={}m", region / MIB),
            format!("--ioengine={}", cfg.cli.fio_engine),
            "--time_based".into(),
            format!("--runtime={runtime}"),
            "--norandommap".into(),
            "--randrepeat=0".into(),
        ],
    );
    let snap = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let t = Instant::now();
        let id = create_snapshot(ctl, volume_id, &format!("stall-{key}")).await;
        (id, t.elapsed().as_secs_f64())
    };
    let (w, (id, secs)) = tokio::join!(fio(&args, "write"), snap);
    let (w, id) = (w?, id?);
    delete_snapshot(ctl, &id).await?;
    unpublish_unstage(&mut node, d, volume_id, &name).await?;
    Ok((secs, w.clat_max, w.clat_p999))
}

const SNAP_VOLUME_BYTES: u64 = 4 * GIB;

async fn fill_volume(
    cfg: &Cfg,
    d: &Driver,
    ctl: &mut ControllerClient<Channel>,
    volume_id: &str,
    case: &Case,
) -> Result<f64> {
    let mut node = d.node().await?;
    let (target, _, _) = stage_publish(&mut node, d, volume_id, &block_cap(), case.key).await?;
    let engine = format!("--ioengine={}", cfg.cli.fio_engine);
    let seq = |bytes: u64| {
        fio_args(
            &target,
            &[
                "--rw=write".into(),
                "--bs=1m".into(),
                format!("--size={}m", bytes / MIB),
                "--iodepth=16".into(),
                engine.clone(),
            ],
        )
    };
    let random = fio_args(
        &target,
        &[
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            format!("--size={}m", SNAP_VOLUME_BYTES / MIB),
            format!("--io_size={}m", GIB / MIB),
            "--iodepth=32".into(),
            "--randrepeat=1".into(),
            engine.clone(),
        ],
    );
    let t = Instant::now();
    match case.fill {
        Fill::Seq(bytes) => {
            fio(&seq(bytes), "write").await?;
        }
        Fill::FragCow => {
            fio(&seq(SNAP_VOLUME_BYTES), "write").await?;
            let base = create_snapshot(ctl, volume_id, &format!("base-{}", case.key)).await?;
            let r = fio(&random, "write").await?;
            note!("{}: random writes {:.0} IOPS", case.key, r.iops);
            delete_snapshot(ctl, &base).await?;
            settle(&d.pool_root()).await?;
        }
        Fill::FragSparse => {
            let r = fio(&random, "write").await?;
            note!("{}: random writes {:.0} IOPS", case.key, r.iops);
        }
    }
    let took = t.elapsed().as_secs_f64();
    unpublish_unstage(&mut node, d, volume_id, case.key).await?;
    Ok(took)
}

async fn snapshot_case(cfg: &Cfg, d: &Driver, case: &Case) -> Result<CaseResult> {
    let mut ctl = d.controller().await?;
    let src = create_volume(
        &mut ctl,
        create_req(&format!("src-{}", case.key), SNAP_VOLUME_BYTES, block_cap()),
    )
    .await?;
    note!("{}: writing data", case.key);
    let fill_secs = fill_volume(cfg, d, &mut ctl, &src, case).await?;
    let image = d.volume_image(&src);
    let ext = extents(&image).await?;
    let alloc = allocated(&image);
    note!(
        "{}: written in {:.1} s; {} MiB allocated, filefrag {} extents, {} XFS mapping records",
        case.key,
        fill_secs,
        alloc / MIB,
        ext.0,
        ext.1
    );
    let copy_dir = d.pool_root().join("bench-copy");
    fs::create_dir_all(&copy_dir)?;
    let copy = copy_dir.join("copy.img");
    let mut r = CaseResult {
        label: case.label,
        fill: case.fill,
        snapshot: Series::default(),
        restore: Series::default(),
        copy: Series::default(),
        delete_snapshot: Series::default(),
        delete_restored: Series::default(),
        deferred_free: Series::default(),
        extents: ext,
        allocated: alloc,
        fill_secs,
        stall: (f64::NAN, f64::NAN, f64::NAN),
    };
    for round in 0..cfg.cli.runs {
        for side in order(round) {
            match side {
                Side::Berth => {
                    let t = Instant::now();
                    let snap =
                        create_snapshot(&mut ctl, &src, &format!("snap-{}-{round}", case.key))
                            .await?;
                    r.snapshot.push(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    let restored = create_volume(
                        &mut ctl,
                        from_snapshot(
                            create_req(
                                &format!("restore-{}-{round}", case.key),
                                SNAP_VOLUME_BYTES,
                                block_cap(),
                            ),
                            &snap,
                        ),
                    )
                    .await?;
                    r.restore.push(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    delete_volume(&mut ctl, &restored).await?;
                    r.delete_restored.push(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    delete_snapshot(&mut ctl, &snap).await?;
                    r.delete_snapshot.push(t.elapsed().as_secs_f64());
                    // Not part of any figure: lets the freeing finish before the next step
                    // (it would otherwise slow it down) and shows what it costs.
                    r.deferred_free.push(settle(&d.pool_root()).await?);
                }
                Side::Baseline => {
                    drop_cache(&image)?;
                    let t = Instant::now();
                    run(
                        "cp",
                        &["--reflink=never", "--sparse=always", p(&image), p(&copy)],
                    )
                    .await?;
                    File::open(&copy)?.sync_all()?;
                    r.copy.push(t.elapsed().as_secs_f64());
                    fs::remove_file(&copy)?;
                    settle(&d.pool_root()).await?;
                }
            }
        }
        note!(
            "{} round {}/{}: snapshot {}, restore {}, full copy {}",
            case.key,
            round + 1,
            cfg.cli.runs,
            fmt_secs(*r.snapshot.all.last().unwrap_or(&f64::NAN)),
            fmt_secs(*r.restore.all.last().unwrap_or(&f64::NAN)),
            fmt_secs(*r.copy.all.last().unwrap_or(&f64::NAN)),
        );
    }
    // The writer stays inside the written data, so it overwrites blocks instead of adding
    // allocations (and mapping records) of its own before the snapshot.
    let region = match case.fill {
        Fill::Seq(bytes) => bytes,
        Fill::FragCow | Fill::FragSparse => SNAP_VOLUME_BYTES,
    };
    r.stall = snapshot_stall(
        cfg,
        d,
        &mut ctl,
        &src,
        case.key,
        r.snapshot.median(),
        region,
    )
    .await?;
    note!(
        "{}: snapshot with a writer attached took {}, longest write {}",
        case.key,
        fmt_secs(r.stall.0),
        fmt_secs(r.stall.1)
    );
    delete_volume(&mut ctl, &src).await?;
    Ok(r)
}

async fn bench_snapshot(cfg: &Cfg) -> Result<()> {
    section_header(
        "2. CreateSnapshot and 3. restore (CreateVolume from snapshot)",
        Section::Snapshot,
    );
    let d = Driver::start(cfg, "snapshot").await?;
    let mut cases = vec![
        Case {
            key: "seq256m",
            label: "256 MiB sequential",
            fill: Fill::Seq(256 * MIB),
        },
        Case {
            key: "seq1g",
            label: "1 GiB sequential",
            fill: Fill::Seq(GIB),
        },
        Case {
            key: "seq4g",
            label: "4 GiB sequential",
            fill: Fill::Seq(4 * GIB),
        },
        Case {
            key: "fragcow",
            label: "4 GiB seq + 1 GiB random 4 KiB after a snapshot",
            fill: Fill::FragCow,
        },
    ];
    if cfg.cli.with_sparse_frag {
        cases.push(Case {
            key: "fragsparse",
            label: "empty + 1 GiB random 4 KiB",
            fill: Fill::FragSparse,
        });
    }
    let mut results = Vec::new();
    for case in &cases {
        results.push(snapshot_case(cfg, &d, case).await?);
    }
    drop(d);

    let headers = [
        "volume data (4 GiB block volume)",
        "berth median",
        "berth p99",
        "full copy median",
        "berth / copy",
        "target",
        "met?",
    ];
    let mut snap = Table::new(&headers);
    let mut restore = Table::new(&headers);
    for r in &results {
        let frag = !matches!(r.fill, Fill::Seq(_));
        let (snap_target, snap_limit) = if frag {
            ("< 2 s", 2.0)
        } else {
            ("< 100 ms", 0.1)
        };
        for (table, s, target, limit) in [
            (&mut snap, &r.snapshot, snap_target, snap_limit),
            (&mut restore, &r.restore, "< 200 ms", 0.2),
        ] {
            table.row(vec![
                r.label.into(),
                fmt_secs(s.median()),
                fmt_secs(s.p99()),
                fmt_secs(r.copy.median()),
                fmt_ratio(s.median() / r.copy.median()),
                target.into(),
                yes_no(s.median() < limit),
            ]);
        }
    }
    say("### 2. CreateSnapshot latency\n");
    snap.print();
    say("### 3. Restore (CreateVolume from snapshot) latency\n");
    restore.print();
    let mut info = Table::new(&[
        "volume data",
        "allocated",
        "extents (filefrag)",
        "XFS mapping records",
        "writing it took",
        "DeleteSnapshot median",
        "DeleteVolume (restored) median",
        "deferred freeing after both (fsfreeze) median",
    ]);
    for r in &results {
        info.row(vec![
            r.label.into(),
            format!("{} MiB", r.allocated / MIB),
            r.extents.0.to_string(),
            r.extents.1.to_string(),
            fmt_secs(r.fill_secs),
            fmt_secs(r.delete_snapshot.median()),
            fmt_secs(r.delete_restored.median()),
            fmt_secs(r.deferred_free.median()),
        ]);
    }
    say("### Image layout of the measured volumes\n");
    info.print();
    let mut stall = Table::new(&[
        "volume data",
        "CreateSnapshot (volume attached, writer running)",
        "longest single 4 KiB write",
        "writer's p99.9 write latency",
    ]);
    for r in &results {
        stall.row(vec![
            r.label.into(),
            fmt_secs(r.stall.0),
            fmt_secs(r.stall.1),
            fmt_secs(r.stall.2),
        ]);
    }
    say("### Volume I/O while CreateSnapshot runs\n");
    stall.print();
    say(&format!(
        "{} rounds per volume. Data written with fio ({} engine, direct=1) through the published \
         block volume; 1 MiB sequential writes, iodepth 16; random: 4 KiB randwrite, iodepth 32, \
         io_size 1 GiB over the 4 GiB device, randrepeat=1. Baseline (one per round, interleaved, \
         used for both tables): `cp --reflink=never --sparse=always IMAGE COPY` of the volume's \
         image on the same pool filesystem, then fsync of the copy, with the image's page cache \
         dropped first (posix_fadvise DONTNEED) as it is for a volume written with direct I/O. \
         Extents counted on the source image after writing: `filefrag IMAGE` and \
         `xfs_io -r -c stat IMAGE` (fsxattr.nextents). Last table: one CreateSnapshot per \
         volume after the rounds, with the volume staged and published as a block device and \
         `fio --rw=randwrite --bs=4k --iodepth=1 --direct=1` running on it; the snapshot \
         starts 2 s into the fio run; the writer stays within the volume's data (the first 256 MiB \
         / 1 GiB / all 4 GiB). After each round's DeleteVolume + DeleteSnapshot (and after removing \
         the baseline's copy) the bench freezes and thaws the pool (`fsfreeze -f POOL; fsfreeze -u \
         POOL`), which waits for the extent freeing XFS defers to the background after a delete; \
         untimed for the figures above, it is the layout table's last column. Without it that \
         work lands on the next round.\n",
        cfg.cli.runs, cfg.cli.fio_engine
    ));
    Ok(())
}

// ---- 4. Stage/publish cycles -------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ext4,
    Block,
}

/// The baseline cycle: the same steps by hand with the system tools berth itself uses.
async fn manual_cycle(image: &Path, staging: &Path, target: &Path, kind: Kind) -> Result<f64> {
    let t = Instant::now();
    let dev = run("losetup", &["--find", "--show", "--direct-io=on", p(image)]).await?;
    let dev = dev.trim();
    match kind {
        Kind::Ext4 => {
            fs::create_dir_all(staging)?;
            run("mount", &["-t", "ext4", dev, p(staging)]).await?;
            fs::create_dir_all(target)?;
            run("mount", &["--bind", p(staging), p(target)]).await?;
            run("umount", &[p(target)]).await?;
            fs::remove_dir(target)?;
            run("umount", &[p(staging)]).await?;
        }
        Kind::Block => {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            File::create(target)?;
            run("mount", &["--bind", dev, p(target)]).await?;
            run("umount", &[p(target)]).await?;
            fs::remove_file(target)?;
        }
    }
    run("losetup", &["-d", dev]).await?;
    Ok(t.elapsed().as_secs_f64())
}

async fn bench_stage(cfg: &Cfg) -> Result<()> {
    section_header(
        "4. NodeStage + NodePublish + NodeUnpublish + NodeUnstage cycle",
        Section::Stage,
    );
    let d = Driver::start(cfg, "stage").await?;
    let mut ctl = d.controller().await?;
    let mut node = d.node().await?;
    let ext4_cap = mount_cap("ext4");
    let ext4 = create_volume(&mut ctl, create_req("stage-ext4", GIB, ext4_cap.clone())).await?;
    let block = create_volume(&mut ctl, create_req("stage-block", GIB, block_cap())).await?;
    // The first stage formats the volume: measured once, apart.
    let first = berth_cycle(&mut node, &d, &ext4, &ext4_cap, "ext4").await?;
    berth_cycle(&mut node, &d, &block, &block_cap(), "block").await?;

    let base = d.pool_root().join("bench-stage");
    fs::create_dir_all(&base)?;
    let (base_ext4, base_block) = (base.join("ext4.img"), base.join("block.img"));
    for img in [&base_ext4, &base_block] {
        File::create(img)?.set_len(GIB)?;
    }
    // Formatted as berth formats (src/storage/mount.rs), outside the timing.
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            p(&base_ext4),
        ],
    )
    .await?;
    let (bstaging, btarget) = (d.co_path("manual/staging"), d.co_path("manual/target"));
    manual_cycle(&base_ext4, &bstaging, &btarget, Kind::Ext4).await?;
    manual_cycle(&base_block, &bstaging, &btarget, Kind::Block).await?;

    let mut berth_s: [Series; 2] = Default::default();
    let mut manual_s: [Series; 2] = Default::default();
    let mut rpcs: [[Series; 4]; 2] = Default::default();
    for round in 0..cfg.cli.runs {
        for (k, kind) in [Kind::Ext4, Kind::Block].into_iter().enumerate() {
            for side in order(round) {
                let mut samples = Vec::with_capacity(cfg.cli.cycles);
                match side {
                    Side::Berth => {
                        let (vol, cap, name) = match kind {
                            Kind::Ext4 => (&ext4, ext4_cap.clone(), "ext4"),
                            Kind::Block => (&block, block_cap(), "block"),
                        };
                        let mut parts: [Vec<f64>; 4] = Default::default();
                        for _ in 0..cfg.cli.cycles {
                            let c = berth_cycle(&mut node, &d, vol, &cap, name).await?;
                            samples.push(c.total());
                            for (v, x) in
                                parts
                                    .iter_mut()
                                    .zip([c.stage, c.publish, c.unpublish, c.unstage])
                            {
                                v.push(x);
                            }
                        }
                        berth_s[k].push_round(&samples);
                        for (s, v) in rpcs[k].iter_mut().zip(parts.iter()) {
                            s.push_round(v);
                        }
                    }
                    Side::Baseline => {
                        let img = if kind == Kind::Ext4 {
                            &base_ext4
                        } else {
                            &base_block
                        };
                        for _ in 0..cfg.cli.cycles {
                            samples.push(manual_cycle(img, &bstaging, &btarget, kind).await?);
                        }
                        manual_s[k].push_round(&samples);
                    }
                }
            }
        }
        note!(
            "stage round {}/{}: ext4 {} (manual {}), block {} (manual {})",
            round + 1,
            cfg.cli.runs,
            fmt_secs(*berth_s[0].per_run.last().unwrap_or(&f64::NAN)),
            fmt_secs(*manual_s[0].per_run.last().unwrap_or(&f64::NAN)),
            fmt_secs(*berth_s[1].per_run.last().unwrap_or(&f64::NAN)),
            fmt_secs(*manual_s[1].per_run.last().unwrap_or(&f64::NAN)),
        );
    }
    let mut t = Table::new(&[
        "cycle (1 GiB volume)",
        "berth p50",
        "berth p99",
        "manual p50",
        "manual p99",
        "berth / manual",
        "target",
        "met?",
    ]);
    for (k, label) in ["ext4 (mount)", "block"].into_iter().enumerate() {
        t.row(vec![
            format!("{label}: stage+publish+unpublish+unstage"),
            fmt_secs(berth_s[k].median()),
            fmt_secs(berth_s[k].p99()),
            fmt_secs(manual_s[k].median()),
            fmt_secs(manual_s[k].p99()),
            fmt_ratio(berth_s[k].median() / manual_s[k].median()),
            "—".into(),
            "—".into(),
        ]);
    }
    t.print();
    let mut parts = Table::new(&["RPC", "ext4 p50", "ext4 p99", "block p50", "block p99"]);
    for (i, name) in [
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeUnstageVolume",
    ]
    .into_iter()
    .enumerate()
    {
        parts.row(vec![
            name.into(),
            fmt_secs(rpcs[0][i].median()),
            fmt_secs(rpcs[0][i].p99()),
            fmt_secs(rpcs[1][i].median()),
            fmt_secs(rpcs[1][i].p99()),
        ]);
    }
    parts.row(vec![
        "first NodeStageVolume of a blank volume (incl. mkfs.ext4; one sample)".into(),
        fmt_secs(first.stage),
        "—".into(),
        "—".into(),
        "—".into(),
    ]);
    say("Per RPC:\n");
    parts.print();
    say(&format!(
        "{} rounds × {} cycles per kind, on an already formatted 1 GiB volume. Manual baseline, \
         same order of steps on a 1 GiB image in the pool: `losetup --find --show --direct-io=on IMG`, \
         `mount -t ext4 DEV STAGING` (ext4 only), `mount --bind STAGING|DEV TARGET`, `umount TARGET`, \
         `umount STAGING` (ext4 only), `losetup -d DEV`.\n",
        cfg.cli.runs, cfg.cli.cycles
    ));
    drop(d);
    Ok(())
}

// ---- 5. Memory and start-up --------------------------------------------------------------

/// A few hundred RPCs of every kind the CO sends; returns how many were sent.
async fn rpc_load(d: &Driver, total: usize) -> Result<usize> {
    let ch = d.channel().await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch.clone());
    let mut id = IdentityClient::new(ch);
    let mut sent = 0;
    let mut i = 0usize;
    while sent < total {
        id.probe(csi::ProbeRequest {}).await?;
        id.get_plugin_info(csi::GetPluginInfoRequest {}).await?;
        ctl.get_capacity(csi::GetCapacityRequest::default()).await?;
        let vol =
            create_volume(&mut ctl, create_req(&format!("mem-{i}"), GIB, block_cap())).await?;
        ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: vol.clone(),
        })
        .await?;
        ctl.list_volumes(csi::ListVolumesRequest::default()).await?;
        node.node_get_info(csi::NodeGetInfoRequest {}).await?;
        sent += 7;
        if i.is_multiple_of(10) {
            let snap = create_snapshot(&mut ctl, &vol, &format!("mem-{i}")).await?;
            delete_snapshot(&mut ctl, &snap).await?;
            berth_cycle(&mut node, d, &vol, &block_cap(), &format!("mem-{i}")).await?;
            sent += 6;
        }
        delete_volume(&mut ctl, &vol).await?;
        sent += 1;
        i += 1;
    }
    Ok(sent)
}

async fn bench_memory(cfg: &Cfg) -> Result<()> {
    section_header("5. Start-up time and resident memory", Section::Memory);
    let (mut cold, mut warm) = (Series::default(), Series::default());
    let (mut rss_idle, mut rss_after, mut hwm) =
        (Series::default(), Series::default(), Series::default());
    let mut sent = 0;
    for round in 0..cfg.cli.runs {
        let dir = format!("memory-{round}");
        fs::create_dir_all(cfg.root.join(&dir))?;
        let mut d = Driver {
            dir: cfg.root.join(&dir),
            berth: cfg.berth.clone(),
            pool_size: cfg.cli.pool_size.clone(),
            child: None,
        };
        // Cold: a fresh state dir (pool image created, formatted, mounted).
        cold.push(d.spawn().await?.as_secs_f64());
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_idle.push(d.memory()?.0 as f64);
        sent = rpc_load(&d, cfg.cli.rpcs).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss, peak) = d.memory()?;
        rss_after.push(rss as f64);
        hwm.push(peak as f64);
        // Warm: a restart on the same state dir (pool already there and mounted).
        d.stop().await?;
        warm.push(d.spawn().await?.as_secs_f64());
        note!(
            "memory round {}/{}: cold start {}, warm start {}, RSS idle {:.1} MiB, after {sent} RPCs {:.1} MiB",
            round + 1,
            cfg.cli.runs,
            fmt_secs(*cold.all.last().unwrap_or(&f64::NAN)),
            fmt_secs(*warm.all.last().unwrap_or(&f64::NAN)),
            *rss_idle.all.last().unwrap_or(&0.0) / MIB as f64,
            *rss_after.all.last().unwrap_or(&0.0) / MIB as f64,
        );
        drop(d);
    }
    let mib = |x: f64| format!("{:.1} MiB", x / MIB as f64);
    let mut t = Table::new(&["measurement", "median", "max (p99)", "target", "met?"]);
    t.row(vec![
        "start-up, fresh state dir (spawn → Probe answers; creates, formats and mounts the pool)"
            .into(),
        fmt_secs(cold.median()),
        fmt_secs(cold.p99()),
        "—".into(),
        "—".into(),
    ]);
    t.row(vec![
        "start-up, restart on an existing state dir (spawn → Probe answers)".into(),
        fmt_secs(warm.median()),
        fmt_secs(warm.p99()),
        "—".into(),
        "—".into(),
    ]);
    t.row(vec![
        "VmRSS, idle after start-up".into(),
        mib(rss_idle.median()),
        mib(rss_idle.p99()),
        "< 20 MiB".into(),
        yes_no(rss_idle.median() < 20.0 * MIB as f64),
    ]);
    t.row(vec![
        format!("VmRSS, idle after {sent} RPCs"),
        mib(rss_after.median()),
        mib(rss_after.p99()),
        "< 20 MiB".into(),
        yes_no(rss_after.median() < 20.0 * MIB as f64),
    ]);
    t.row(vec![
        format!("VmHWM (peak RSS) after {sent} RPCs"),
        mib(hwm.median()),
        mib(hwm.p99()),
        "—".into(),
        "—".into(),
    ]);
    t.print();
    say(&format!(
        "{} fresh processes, each with a {} pool image; RSS read from /proc/PID/status 1 s after \
         start-up and 1 s after the RPCs (connection closed). The RPCs, on one channel: Probe, \
         GetPluginInfo, GetCapacity, CreateVolume, ControllerGetVolume, ListVolumes, NodeGetInfo, \
         DeleteVolume, and every 10th time also CreateSnapshot, DeleteSnapshot and a block \
         stage/publish/unpublish/unstage cycle. No baseline: absolute targets.\n",
        cfg.cli.runs, cfg.cli.pool_size
    ));
    Ok(())
}

// ---- 6. fio ------------------------------------------------------------------------------

struct FioJob {
    label: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    dir: &'static str,
    /// Report IOPS (else MiB/s).
    iops: bool,
}

const FIO_JOBS: [FioJob; 4] = [
    FioJob {
        label: "4 KiB random read, QD32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        dir: "read",
        iops: true,
    },
    FioJob {
        label: "4 KiB random write, QD32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        dir: "write",
        iops: true,
    },
    FioJob {
        label: "1 MiB sequential read, QD8",
        rw: "read",
        bs: "1m",
        iodepth: 8,
        dir: "read",
        iops: false,
    },
    FioJob {
        label: "1 MiB sequential write, QD8",
        rw: "write",
        bs: "1m",
        iodepth: 8,
        dir: "write",
        iops: false,
    },
];

async fn bench_fio(cfg: &Cfg) -> Result<()> {
    section_header(
        "6. fio: published berth ext4 volume vs a file on the pool filesystem",
        Section::Fio,
    );
    let size_mib = cfg.cli.fio_size_mib;
    let d = Driver::start(cfg, "fio").await?;
    let mut ctl = d.controller().await?;
    let mut node = d.node().await?;
    let cap = mount_cap("ext4");
    let vol_bytes = (size_mib * MIB + GIB).max(2 * GIB);
    let vol = create_volume(&mut ctl, create_req("fio", vol_bytes, cap.clone())).await?;
    let (target, _, _) = stage_publish(&mut node, &d, &vol, &cap, "fio").await?;
    let pool_dir = d.pool_root().join("bench-fio");
    fs::create_dir_all(&pool_dir)?;
    let files = [target.join("fio.dat"), pool_dir.join("fio.dat")];
    let engine = format!("--ioengine={}", cfg.cli.fio_engine);
    let size = format!("--size={size_mib}m");
    // Lay the file out in full on both sides first (every block written), so random writes
    // overwrite allocated blocks on both sides instead of allocating on one.
    for f in &files {
        let r = fio(
            &fio_args(
                f,
                &[
                    "--rw=write".into(),
                    "--bs=1m".into(),
                    "--iodepth=8".into(),
                    "--end_fsync=1".into(),
                    size.clone(),
                    engine.clone(),
                ],
            ),
            "write",
        )
        .await?;
        note!("laid out {} at {:.0} MiB/s", f.display(), r.bw_mib);
    }
    // ext4's lazy inode-table init runs in the background after the first mount.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut res: Vec<[Vec<FioResult>; 2]> = FIO_JOBS.iter().map(|_| Default::default()).collect();
    for round in 0..cfg.cli.runs {
        for (j, job) in FIO_JOBS.iter().enumerate() {
            for side in order(round) {
                let i = if side == Side::Berth { 0 } else { 1 };
                let r = fio(
                    &fio_args(
                        &files[i],
                        &[
                            format!("--rw={}", job.rw),
                            format!("--bs={}", job.bs),
                            format!("--iodepth={}", job.iodepth),
                            size.clone(),
                            engine.clone(),
                            "--time_based".into(),
                            format!("--runtime={}", cfg.cli.fio_runtime),
                            "--norandommap".into(),
                            "--randrepeat=0".into(),
                        ],
                    ),
                    job.dir,
                )
                .await?;
                res[j][i].push(r);
            }
            let last = |i: usize| res[j][i].last().copied().expect("just pushed");
            note!(
                "fio round {}/{} {}: berth {:.0} IOPS {:.0} MiB/s, pool {:.0} IOPS {:.0} MiB/s",
                round + 1,
                cfg.cli.runs,
                job.rw,
                last(0).iops,
                last(0).bw_mib,
                last(1).iops,
                last(1).bw_mib
            );
        }
    }
    unpublish_unstage(&mut node, &d, &vol, "fio").await?;
    delete_volume(&mut ctl, &vol).await?;
    drop(d);

    let mut t = Table::new(&[
        "job (direct=1)",
        "berth volume median",
        "berth p99 clat",
        "pool file median",
        "pool p99 clat",
        "berth / pool",
        "target",
        "met?",
        "CPU busy (berth / pool)",
    ]);
    for (j, job) in FIO_JOBS.iter().enumerate() {
        let fig = |i: usize| -> f64 {
            median(
                &res[j][i]
                    .iter()
                    .map(|r| if job.iops { r.iops } else { r.bw_mib })
                    .collect::<Vec<_>>(),
            )
        };
        let clat = |i: usize| median(&res[j][i].iter().map(|r| r.clat_p99).collect::<Vec<_>>());
        let cpu = |i: usize| median(&res[j][i].iter().map(|r| r.cpu_busy).collect::<Vec<_>>());
        let unit = |x: f64| {
            if job.iops {
                format!("{x:.0} IOPS")
            } else {
                format!("{x:.0} MiB/s")
            }
        };
        let ratio = fig(0) / fig(1);
        t.row(vec![
            job.label.into(),
            unit(fig(0)),
            fmt_secs(clat(0)),
            unit(fig(1)),
            fmt_secs(clat(1)),
            fmt_ratio(ratio),
            "≥ 0.90×".into(),
            yes_no(ratio >= 0.9),
            format!("{:.0}% / {:.0}%", 100.0 * cpu(0), 100.0 * cpu(1)),
        ]);
    }
    t.print();
    say(&format!(
        "{} rounds, each job {} s (time_based) on a {size_mib} MiB file, `--direct=1 --ioengine={} \
         --numjobs=1 --norandommap --randrepeat=0`, berth and pool alternating. Berth side: \
         `fio.dat` in a {} GiB ext4 volume staged and published by berth (loop device, direct I/O). \
         Pool side: `fio.dat` directly on the pool's XFS (`<state_dir>/pool/bench-fio/`). Both files \
         were first laid out in full with a sequential 1 MiB write (+fsync), so random writes \
         overwrite allocated blocks on both sides. \"p99 clat\" is fio's 99th-percentile completion \
         latency, median over rounds. \"CPU busy\": share of both cores not idle or in iowait, \
         machine-wide (so including anything else running), median over rounds.\n",
        cfg.cli.runs,
        cfg.cli.fio_runtime,
        cfg.cli.fio_engine,
        vol_bytes / GIB
    ));
    Ok(())
}

// ---- main --------------------------------------------------------------------------------

async fn preflight(cfg: &Cfg, sections: &[Section]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("berth-bench must run as root: berth attaches loop devices and mounts filesystems");
    }
    if !cfg.berth.is_file() {
        bail!(
            "no berth binary at {} (build it, or pass --berth PATH)",
            cfg.berth.display()
        );
    }
    if cfg.cli.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut tools = vec!["losetup", "mount", "umount"];
    if sections.contains(&Section::Snapshot) {
        tools.extend(["fio", "filefrag", "xfs_io", "cp", "fsfreeze"]);
    }
    if sections.contains(&Section::Stage) {
        tools.push("mkfs.ext4");
    }
    if sections.contains(&Section::Fio) {
        tools.push("fio");
    }
    if sections.contains(&Section::Move) {
        tools.extend(["fio", "fstrim", "fsfreeze"]);
    }
    for tool in tools {
        if run("sh", &["-c", &format!("command -v {tool}")])
            .await
            .is_err()
        {
            bail!(
                "{tool} is not installed (Debian: fio, e2fsprogs, xfsprogs, util-linux, coreutils)"
            );
        }
    }
    Ok(())
}

async fn bench(cfg: &Cfg, sections: &[Section]) -> Result<()> {
    preflight(cfg, sections).await?;
    say(&format!(
        "# berth-bench results\n\n{}\n- sections: {}; {} rounds each\n",
        machine_summary(cfg).await,
        sections
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.cli.runs
    ));
    let started = Instant::now();
    for &s in sections {
        let t = Instant::now();
        note!("section {} (load {})", s.name(), loadavg());
        match s {
            Section::Rpc => bench_rpc(cfg).await?,
            Section::Snapshot => bench_snapshot(cfg).await?,
            Section::Stage => bench_stage(cfg).await?,
            Section::Memory => bench_memory(cfg).await?,
            Section::Fio => bench_fio(cfg).await?,
            Section::Move => move_section::bench_move(cfg).await?,
            Section::Scale => scale_section::bench_scale(cfg).await?,
            Section::Failover => failover_section::bench_failover(cfg).await?,
        }
        say(&format!(
            "_Section took {:.1} s; load average after: {}._\n",
            t.elapsed().as_secs_f64(),
            loadavg()
        ));
    }
    say(&format!(
        "_Total: {:.0} s._",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let berth = match &cli.berth {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map(|e| e.with_file_name("berth"))
            .unwrap_or_else(|_| PathBuf::from("berth")),
    };
    let sections: Vec<Section> = if cli.only.is_empty() {
        Section::ALL.to_vec()
    } else {
        Section::ALL
            .into_iter()
            .filter(|s| cli.only.contains(s))
            .collect()
    };
    let workdir = cli.workdir.clone().unwrap_or_else(std::env::temp_dir);
    let workdir = fs::canonicalize(&workdir).unwrap_or(workdir);
    let root = workdir.join(format!(
        "berth-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    if let Err(e) = fs::create_dir_all(&root) {
        eprintln!("berth-bench: create {}: {e}", root.display());
        return std::process::ExitCode::FAILURE;
    }
    let cfg = Cfg { cli, berth, root };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        tokio::select! {
            r = bench(&cfg, &sections) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    // Whatever a section left behind (an error path, Ctrl-C) goes with the temp dir.
    drop(rt);
    cleanup_tree(&cfg.root);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
