//! Section 7: moving volumes between nodes (issue 3).
//!
//! Starts a real two-node berth cluster on loopback, as an operator would: `berth certs`,
//! two `berth node --agent-listen 127.0.0.1:PORT --tls-dir ...` processes, each with its own
//! sparse pool, and `berth controller --nodes FILE --tls-dir ...`. Volumes are moved the way
//! Kubernetes moves them: NodeUnpublish, NodeUnstage and ControllerUnpublish on the old node,
//! then ControllerPublish on the new one (the controller hands the volume off inside that
//! call), then NodeStage and NodePublish there.
//!
//! Measured, each a median over `--runs` rounds against a named baseline:
//! - cut-over downtime after a pre-warm (`berth migrate`) with 64 MiB changed since, against
//!   stop-and-copy (the same move with no replica on the target);
//! - the same cut-over in a larger volume holding the same data, against the smaller one;
//! - moves of fully written volumes without a replica, against a plain TCP copy of the same
//!   bytes over 127.0.0.1 (no TLS, no hashing), which also gives the transfer throughput.
//!
//! Where the time goes is read from the processes' own log lines (timestamps of the
//! controller's and both nodes' info messages for fence, shipping and promotion), from their
//! CPU time in /proc, and, for deltas of scattered changes, from fio reading the same number
//! of scattered blocks one at a time.

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    os::unix::fs::FileExt,
    time::{SystemTime, UNIX_EPOCH},
};

use berth::proto::agent::v1::{self as pb, agent_client::AgentClient};

use super::*;

const NODES: [&str; 2] = ["node-a", "node-b"];
/// Chunk of the raw TCP baseline: the transfer engine's own chunk size.
const RAW_CHUNK: usize = 4 << 20;

/// One `berth node` process.
struct NodeProc {
    id: &'static str,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl NodeProc {
    fn socket(&self) -> PathBuf {
        self.dir.join("csi.sock")
    }
    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    fn pool_root(&self) -> PathBuf {
        self.dir.join("state").join("pool")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("berth.log")
    }
    fn co_path(&self, name: &str) -> PathBuf {
        self.dir.join("k8s").join(name)
    }
    fn volume_image(&self, volume_id: &str) -> PathBuf {
        self.pool_root()
            .join("berth/volumes")
            .join(format!("{volume_id}.img"))
    }
}

/// A controller and two nodes under `dir`; stopping it (drop) kills the processes and
/// undoes every mount and loop device under `dir`.
struct TestCluster {
    dir: PathBuf,
    nodes: Vec<NodeProc>,
    controller: Option<Child>,
    ctl: Option<ControllerClient<Channel>>,
    csi: Vec<NodeClient<Channel>>,
    agents: Vec<AgentClient<Channel>>,
    /// `--move-keep-logs`: where the logs go before the directory is removed.
    keep_logs_to: Option<PathBuf>,
}

pub(super) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Spawns berth with `args`, its output appended to `log`, and waits until `endpoint`
/// accepts a connection (and `port`, if any, a TCP connection).
pub(super) async fn spawn_berth(
    berth: &Path,
    args: &[String],
    log: &Path,
    socket: &Path,
    endpoint: &str,
    port: Option<u16>,
) -> Result<Child> {
    let _ = fs::remove_file(socket);
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let mut child = StdCommand::new(berth)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("CSI_ENDPOINT")
        .env_remove("BERTH_FAILPOINT")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", berth.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "berth {} exited during start-up ({status}):\n{}",
                args[0],
                tail(log)
            );
        }
        let csi_up = socket.exists() && berth::client::connect(endpoint).await.is_ok();
        let agent_up = port.is_none_or(|p| TcpStream::connect(("127.0.0.1", p)).is_ok());
        if csi_up && agent_up {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "berth {} did not start within 60 s:\n{}",
                args[0],
                tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `berth controller` over the nodes file in `dir`, serving `endpoint`, with a state
/// directory of its own there (a controller keeps its placement records on disk and must
/// not use /var/lib/berth).
pub(super) fn controller_args(endpoint: &str, dir: &Path, certs: &Path) -> Vec<String> {
    vec![
        "controller".to_string(),
        "--endpoint".into(),
        endpoint.to_string(),
        "--node-id".into(),
        "controller".into(),
        "--nodes".into(),
        s(dir.join("nodes")),
        "--state-dir".into(),
        s(dir.join("controller-state")),
        "--tls-dir".into(),
        s(certs.join("controller")),
    ]
}

/// `berth node` `id` with its agent on 127.0.0.1:`port`, its state in `dir`, serving
/// `endpoint`, its pool image `pool_size`.
pub(super) fn node_args(
    id: &str,
    endpoint: String,
    dir: &Path,
    pool_size: &str,
    port: u16,
    certs: &Path,
) -> Vec<String> {
    vec![
        "node".to_string(),
        "--endpoint".into(),
        endpoint,
        "--state-dir".into(),
        s(dir.join("state")),
        "--node-id".into(),
        id.into(),
        "--pool-size".into(),
        pool_size.into(),
        "--agent-listen".into(),
        format!("127.0.0.1:{port}"),
        "--tls-dir".into(),
        s(certs.join(id)),
    ]
}

/// Starts the controller of the cluster in `dir` (`controller_args`) and connects to it.
pub(super) async fn start_controller(
    berth: &Path,
    dir: &Path,
    certs: &Path,
) -> Result<(Child, ControllerClient<Channel>)> {
    let csock = dir.join("controller.sock");
    let cend = format!("unix://{}", csock.display());
    let args = controller_args(&cend, dir, certs);
    let child = spawn_berth(
        berth,
        &args,
        &dir.join("controller.log"),
        &csock,
        &cend,
        None,
    )
    .await?;
    Ok((
        child,
        ControllerClient::new(berth::client::connect(&cend).await?),
    ))
}

pub(super) fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

impl TestCluster {
    async fn start(cfg: &Cfg) -> Result<TestCluster> {
        let dir = cfg.root.join("move");
        fs::create_dir_all(&dir)?;
        let mut c = TestCluster {
            dir: dir.clone(),
            nodes: Vec::new(),
            controller: None,
            ctl: None,
            csi: Vec::new(),
            agents: Vec::new(),
            keep_logs_to: cfg.cli.move_keep_logs.clone(),
        };
        let certs = dir.join("certs");
        let mut args = vec!["certs".to_string(), "--out".into(), s(&certs)];
        args.extend(NODES.iter().map(|n| n.to_string()));
        args.push("controller".into());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(p(&cfg.berth), &a).await?;
        let mut nodes_file = String::new();
        for id in NODES {
            let port = free_port()?;
            nodes_file.push_str(&format!("{id} 127.0.0.1:{port}\n"));
            c.nodes.push(NodeProc {
                id,
                dir: dir.join(id),
                port,
                child: None,
            });
        }
        fs::write(dir.join("nodes"), nodes_file)?;
        for n in &mut c.nodes {
            fs::create_dir_all(&n.dir)?;
            let args = node_args(
                n.id,
                n.endpoint(),
                &n.dir,
                &cfg.cli.move_pool_size,
                n.port,
                &certs,
            );
            n.child = Some(
                spawn_berth(
                    &cfg.berth,
                    &args,
                    &n.log(),
                    &n.socket(),
                    &n.endpoint(),
                    Some(n.port),
                )
                .await?,
            );
        }
        let (controller, ctl) = start_controller(&cfg.berth, &dir, &certs).await?;
        c.controller = Some(controller);
        c.ctl = Some(ctl);
        let tls = berth::tls::TlsMaterial::load(&certs.join("controller"))
            .map_err(|e| format!("controller TLS material: {e}"))?;
        for n in &c.nodes {
            c.csi.push(NodeClient::new(
                berth::client::connect(&n.endpoint()).await?,
            ));
            let ch = berth::agent::channel(n.id, &format!("127.0.0.1:{}", n.port), &tls)
                .map_err(|e| format!("agent channel: {e}"))?;
            c.agents.push(AgentClient::new(ch));
        }
        Ok(c)
    }

    fn controller_socket(&self) -> PathBuf {
        self.dir.join("controller.sock")
    }
    fn controller_log(&self) -> PathBuf {
        self.dir.join("controller.log")
    }
    fn ctl(&self) -> ControllerClient<Channel> {
        self.ctl.clone().expect("controller client")
    }

    async fn inventory(&self, i: usize) -> Result<pb::InventoryResponse> {
        Ok(self.agents[i]
            .clone()
            .inventory(pb::InventoryRequest {})
            .await
            .map_err(|e| format!("Inventory of {}: {e}", self.nodes[i].id))?
            .into_inner())
    }

    async fn received_bytes(&self, i: usize) -> Result<u64> {
        Ok(self
            .inventory(i)
            .await?
            .counters
            .unwrap_or_default()
            .received_data_bytes)
    }

    async fn role_on(&self, i: usize, vol: &str) -> Result<Option<pb::Role>> {
        Ok(self
            .inventory(i)
            .await?
            .volumes
            .iter()
            .find(|v| v.volume_id == vol)
            .and_then(|v| pb::Role::try_from(v.role).ok()))
    }

    /// CreateVolume through the controller, placed on node `on`.
    async fn create(
        &self,
        name: &str,
        bytes: u64,
        on: usize,
        params: &[(&str, &str)],
    ) -> Result<String> {
        let mut req = create_req(name, bytes, block_cap());
        req.parameters = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![],
            preferred: vec![csi::Topology {
                segments: [(
                    "topology.berth.csi.dev/node".to_string(),
                    self.nodes[on].id.to_string(),
                )]
                .into(),
            }],
        });
        create_volume(&mut self.ctl(), req).await
    }

    async fn delete(&self, vol: &str) -> Result<()> {
        delete_volume(&mut self.ctl(), vol).await
    }

    async fn ctl_publish(&self, i: usize, vol: &str) -> Result<()> {
        self.ctl()
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: vol.into(),
                node_id: self.nodes[i].id.into(),
                volume_capability: Some(block_cap()),
                readonly: false,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("ControllerPublishVolume {vol} on {}: {e}", self.nodes[i].id))?;
        Ok(())
    }

    async fn ctl_unpublish(&self, i: usize, vol: &str) -> Result<()> {
        self.ctl()
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: vol.into(),
                node_id: self.nodes[i].id.into(),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                format!(
                    "ControllerUnpublishVolume {vol} on {}: {e}",
                    self.nodes[i].id
                )
            })?;
        Ok(())
    }

    fn paths(&self, i: usize, vol: &str) -> (String, String) {
        (
            s(self.nodes[i].co_path(&format!("{vol}/staging"))),
            s(self.nodes[i].co_path(&format!("{vol}/target"))),
        )
    }

    /// NodeStage + NodePublish of a block volume on node `i`; the device path.
    async fn node_attach(&self, i: usize, vol: &str) -> Result<PathBuf> {
        let (staging, target) = self.paths(i, vol);
        let mut n = self.csi[i].clone();
        n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("NodeStageVolume {vol} on {}: {e}", self.nodes[i].id))?;
        n.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging,
            target_path: target.clone(),
            volume_capability: Some(block_cap()),
            readonly: false,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("NodePublishVolume {vol} on {}: {e}", self.nodes[i].id))?;
        Ok(PathBuf::from(target))
    }

    async fn node_detach(&self, i: usize, vol: &str) -> Result<()> {
        let (staging, target) = self.paths(i, vol);
        let mut n = self.csi[i].clone();
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: vol.into(),
            target_path: target,
        })
        .await
        .map_err(|e| format!("NodeUnpublishVolume {vol} on {}: {e}", self.nodes[i].id))?;
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging,
        })
        .await
        .map_err(|e| format!("NodeUnstageVolume {vol} on {}: {e}", self.nodes[i].id))?;
        Ok(())
    }

    async fn attach(&self, i: usize, vol: &str) -> Result<PathBuf> {
        self.ctl_publish(i, vol).await?;
        self.node_attach(i, vol).await
    }

    async fn detach(&self, i: usize, vol: &str) -> Result<()> {
        self.node_detach(i, vol).await?;
        self.ctl_unpublish(i, vol).await
    }

    /// Waits until node `i` holds a replica of `vol` (the replication loop's first round).
    async fn wait_replica(&self, i: usize, vol: &str) -> Result<f64> {
        let t = Instant::now();
        while self.role_on(i, vol).await? != Some(pb::Role::Replica) {
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{} holds no replica of {vol} after 60 s:\n{}",
                    self.nodes[i].id,
                    tail(&self.controller_log())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// `berth migrate VOL --to NODE`: pre-warms node `i`; returns its wall time once it
    /// prints "ready".
    async fn migrate(&self, berth: &Path, i: usize, vol: &str) -> Result<f64> {
        let t = Instant::now();
        let ep = format!("unix://{}", self.controller_socket().display());
        let out = tokio::time::timeout(
            Duration::from_secs(600),
            run(
                p(berth),
                &["migrate", vol, "--to", self.nodes[i].id, "--endpoint", &ep],
            ),
        )
        .await
        .map_err(|_| format!("berth migrate {vol} did not finish within 600 s"))??;
        if !out.lines().any(|l| l.starts_with("ready")) {
            bail!("berth migrate {vol} ended without \"ready\":\n{out}");
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// Waits for the pools' deferred extent freeing and trims them, so the sparse pool
    /// images give deleted data back to the host (untimed housekeeping between cases).
    async fn tidy(&self) {
        for n in &self.nodes {
            let pool = n.pool_root();
            if let Err(e) = settle(&pool).await {
                note!("settle {}: {e}", pool.display());
            }
            if let Err(e) = run("fstrim", &[p(&pool)]).await {
                note!("fstrim {}: {e}", pool.display());
            }
        }
    }

    fn pids(&self, from: usize, to: usize) -> [u32; 3] {
        let pid = |c: &Option<Child>| c.as_ref().map_or(0, Child::id);
        [
            pid(&self.nodes[from].child),
            pid(&self.nodes[to].child),
            pid(&self.controller),
        ]
    }

    fn log_marks(&self) -> LogMarks {
        let len = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
        LogMarks {
            controller: len(&self.controller_log()),
            nodes: self.nodes.iter().map(|n| len(&n.log())).collect(),
        }
    }
}

impl TestCluster {
    fn keep_logs(&self, to: &Path) {
        let _ = fs::create_dir_all(to);
        let mut logs = vec![("controller.log".to_string(), self.controller_log())];
        logs.extend(
            self.nodes
                .iter()
                .map(|n| (format!("{}.log", n.id), n.log())),
        );
        for (name, from) in logs {
            if let Err(e) = fs::copy(&from, to.join(&name)) {
                note!("keep {}: {e}", from.display());
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(to) = self.keep_logs_to.take() {
            self.keep_logs(&to);
        }
        self.ctl = None;
        self.csi.clear();
        self.agents.clear();
        stop_child(&mut self.controller);
        for n in &mut self.nodes {
            stop_child(&mut n.child);
        }
        cleanup_tree(&self.dir);
    }
}

// ---- phases from the logs ----------------------------------------------------------------

/// Log sizes before a move: only lines written after them belong to it.
struct LogMarks {
    controller: u64,
    nodes: Vec<u64>,
}

fn lines_since(path: &Path, from: u64) -> Vec<String> {
    let mut buf = Vec::new();
    if let Ok(f) = File::open(path) {
        let len = f.metadata().map_or(0, |m| m.len());
        buf.resize(len.saturating_sub(from) as usize, 0);
        let _ = f.read_exact_at(&mut buf, from);
    }
    String::from_utf8_lossy(&buf)
        .lines()
        .map(strip_ansi)
        .collect()
}

fn strip_ansi(l: &str) -> String {
    let mut out = String::with_capacity(l.len());
    let mut it = l.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the epoch of a log line's leading RFC 3339 UTC timestamp
/// (`2026-11-28T02:06:00.123456Z`, tracing-subscriber's default).
fn line_time(l: &str) -> Option<f64> {
    let ts = l.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    Some((days_from_civil(y, m, dd) * 86_400 + h * 3600 + mi * 60) as f64 + sec)
}

fn find(lines: &[String], needle: &str) -> Option<(f64, String)> {
    lines
        .iter()
        .find(|l| l.contains(needle))
        .and_then(|l| Some((line_time(l)?, l.clone())))
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let i = line.find(&pat)? + pat.len();
    line[i..].split_whitespace().next()
}

fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Where a hand-off's time went, from the log lines of the controller and both nodes.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    /// ControllerPublish arrives → the controller starts the move (placement lookup).
    locate: f64,
    /// Fence on the old node: fence record + final shipping snapshot (FICLONE).
    fence: f64,
    /// Fence done → the sender starts streaming: the receiver's clone of its base, the
    /// connection, and the sender's plan (FIEMAP comparison or SEEK_DATA walk).
    plan: f64,
    /// Streaming, applying, verifying and accepting the image on the new node.
    transfer: f64,
    /// Promotion on the new node (volume image cloned from the snapshot).
    promote: f64,
    /// Settling the old copy + the new node's own ControllerPublish, until the call returns.
    finish: f64,
}

#[derive(Debug, Default, Clone)]
struct MoveSample {
    /// Old node's ControllerUnpublish returned → new node's ControllerPublish returned.
    downtime: f64,
    /// NodeStage + NodePublish on the new node afterwards.
    attach: f64,
    /// NodeUnpublish started on the old node → NodePublish returned on the new one.
    app_gap: f64,
    /// Data bytes the new node received (its transfer counters).
    received: u64,
    method: String,
    phases: Option<Phases>,
    /// CPU seconds (user + system) of the old node's, the new node's and the controller's
    /// process during the ControllerPublish.
    cpu: [f64; 3],
}

/// CPU seconds (user + system) a process has used so far, from /proc/PID/stat.
fn proc_cpu(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    // utime and stime are fields 14 and 15: indexes 11 and 12 here.
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / ticks
}

fn phases(
    c: &TestCluster,
    marks: &LogMarks,
    from: usize,
    to: usize,
    started: f64,
    ended: f64,
) -> (Option<Phases>, String) {
    let ctl = lines_since(&c.controller_log(), marks.controller);
    let src = lines_since(&c.nodes[from].log(), marks.nodes[from]);
    let dst = lines_since(&c.nodes[to].log(), marks.nodes[to]);
    let sending = find(&src, "sending snapshot");
    let method = sending
        .as_ref()
        .and_then(|(_, l)| field(l, "method"))
        .unwrap_or("?")
        .to_string();
    let ph = (|| {
        let begin = find(&ctl, "moving the volume")?.0;
        let fenced = find(&ctl, "hand-off: shipping the final snapshot")?.0;
        let sent = sending.as_ref()?.0;
        let received = find(&dst, "snapshot received and verified")?.0;
        let promoted = find(&ctl, "hand-off: new primary promoted")?.0;
        Some(Phases {
            locate: begin - started,
            fence: fenced - begin,
            plan: sent - fenced,
            transfer: received - sent,
            promote: promoted - received,
            finish: ended - promoted,
        })
    })();
    (ph, method)
}

/// The CO's side of a move from node `from` to node `to`, timed.
async fn move_volume(c: &TestCluster, vol: &str, from: usize, to: usize) -> Result<MoveSample> {
    let before = c.received_bytes(to).await?;
    let marks = c.log_marks();
    let app = Instant::now();
    c.detach(from, vol).await?;
    let pids = c.pids(from, to);
    let cpu0 = pids.map(proc_cpu);
    let t0 = Instant::now();
    let w0 = wall();
    c.ctl_publish(to, vol).await?;
    let downtime = t0.elapsed().as_secs_f64();
    let w1 = wall();
    let cpu1 = pids.map(proc_cpu);
    let t1 = Instant::now();
    c.node_attach(to, vol).await?;
    let attach = t1.elapsed().as_secs_f64();
    let app_gap = app.elapsed().as_secs_f64();
    let received = c.received_bytes(to).await? - before;
    let (phases, method) = phases(c, &marks, from, to, w0, w1);
    Ok(MoveSample {
        downtime,
        attach,
        app_gap,
        received,
        method,
        phases,
        cpu: [0, 1, 2].map(|i| cpu1[i] - cpu0[i]),
    })
}

// ---- writing data ------------------------------------------------------------------------

fn engine(cfg: &Cfg) -> String {
    format!("--ioengine={}", cfg.cli.fio_engine)
}

/// `bytes` written sequentially from `offset` with 1 MiB direct writes (fio's own
/// pseudo-random buffer, generated once and reused: fast and not compressible).
async fn write_seq(cfg: &Cfg, dev: &Path, offset: u64, bytes: u64) -> Result<f64> {
    let t = Instant::now();
    fio(
        &fio_args(
            dev,
            &[
                "--rw=write".into(),
                "--bs=1m".into(),
                format!("--offset={}", offset),
                format!("--size={}", bytes),
                "--iodepth=16".into(),
                engine(cfg),
            ],
        ),
        "write",
    )
    .await?;
    Ok(t.elapsed().as_secs_f64())
}

/// `bytes` of 4 KiB direct writes at random 4 KiB-aligned offsets within the first
/// `region` bytes, no block twice (fio's random map), a new sequence every time.
async fn write_random(cfg: &Cfg, dev: &Path, region: u64, bytes: u64) -> Result<()> {
    fio(
        &fio_args(
            dev,
            &[
                "--rw=randwrite".into(),
                "--bs=4k".into(),
                format!("--size={region}"),
                format!("--io_size={bytes}"),
                "--iodepth=32".into(),
                "--randrepeat=0".into(),
                engine(cfg),
            ],
        ),
        "write",
    )
    .await?;
    Ok(())
}

/// What scattered 4 KiB reads cost on this disk: `bytes` read as 4 KiB blocks spread evenly
/// over the first `region` bytes of `file`, in ascending order, one at a time (direct I/O,
/// so nothing comes from the page cache) — the access pattern of a sender reading the
/// sorted pieces of a delta of random 4 KiB changes.
async fn scattered_reads(file: &Path, region: u64, bytes: u64) -> Result<f64> {
    let gap = (region / (bytes / 4096)).saturating_sub(4096);
    let t = Instant::now();
    fio(
        &fio_args(
            file,
            &[
                format!("--rw=read:{gap}"),
                "--bs=4k".into(),
                format!("--size={region}"),
                format!("--io_size={bytes}"),
                "--iodepth=1".into(),
                "--ioengine=psync".into(),
            ],
        ),
        "read",
    )
    .await?;
    Ok(t.elapsed().as_secs_f64())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Random,
    Sequential,
}

// ---- the raw TCP baseline ----------------------------------------------------------------

/// Copies the first `len` bytes of `src` to a new file `dst` through a plain TCP connection
/// on 127.0.0.1 (sender and receiver threads in this process, 4 MiB reads and writes, the
/// copy fsynced at the end). No TLS, no hashing, no framing. `direct`: the receiver writes
/// with O_DIRECT, as berth's receiver writes large chunks; otherwise through the page
/// cache. Returns its wall time.
fn raw_tcp_copy(src: &Path, len: u64, dst: &Path, direct: bool) -> Result<f64> {
    drop_cache(src)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dst = dst.to_path_buf();
    let t = Instant::now();
    let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut sock, _) = listener.accept()?;
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        if direct {
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        let mut f = opts.open(&dst)?;
        // Page-aligned, for O_DIRECT.
        let mut backing = vec![0u8; RAW_CHUNK + 4096];
        let start = backing.as_ptr().align_offset(4096);
        let buf = &mut backing[start..start + RAW_CHUNK];
        let mut total = 0u64;
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match sock.read(&mut buf[filled..])? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                break;
            }
            f.write_all(&buf[..filled])?;
            total += filled as u64;
        }
        f.sync_all()?;
        Ok(total)
    });
    let sent = (|| -> std::io::Result<()> {
        let f = File::open(src)?;
        let mut sock = TcpStream::connect(addr)?;
        let mut buf = vec![0u8; RAW_CHUNK];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(RAW_CHUNK as u64) as usize;
            f.read_exact_at(&mut buf[..n], off)?;
            sock.write_all(&buf[..n])?;
            off += n as u64;
        }
        Ok(())
    })();
    let got = receiver
        .join()
        .map_err(|_| "raw copy receiver panicked")??;
    sent?;
    let secs = t.elapsed().as_secs_f64();
    if got != len {
        bail!("raw copy moved {got} bytes, expected {len}");
    }
    Ok(secs)
}

// ---- the cases ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Samples {
    moves: Vec<MoveSample>,
    prewarm: Vec<f64>,
    first_round: Vec<f64>,
    /// `scattered_reads` of the changed amount on the new node after the move.
    scattered: Series,
}

impl Samples {
    fn series(&self, f: impl Fn(&MoveSample) -> f64) -> Series {
        let mut s = Series::default();
        for m in &self.moves {
            s.push(f(m));
        }
        s
    }
    fn phase(&self, f: impl Fn(&Phases) -> f64) -> Series {
        let mut s = Series::default();
        for m in &self.moves {
            if let Some(p) = &m.phases {
                s.push(f(p));
            }
        }
        s
    }
    fn received(&self) -> f64 {
        median(
            &self
                .moves
                .iter()
                .map(|m| m.received as f64)
                .collect::<Vec<_>>(),
        )
    }
    fn methods(&self) -> String {
        let mut m: Vec<&str> = self.moves.iter().map(|m| m.method.as_str()).collect();
        m.sort_unstable();
        m.dedup();
        m.join("/")
    }
}

/// A pre-warmed cut-over: a `size` volume with replicas=2, its first (empty) replication
/// round awaited, `data` bytes written on node A while published there, `berth migrate`
/// to node B, `change` bytes changed, then moved to B.
async fn prewarmed_move(
    cfg: &Cfg,
    c: &TestCluster,
    name: &str,
    size: u64,
    change: Change,
    round: usize,
    out: &mut Samples,
) -> Result<()> {
    let started = Instant::now();
    let (data, delta) = (cfg.cli.move_data_gib * GIB, cfg.cli.move_change_mib * MIB);
    let vol = c
        .create(
            name,
            size,
            0,
            &[("replicas", "2"), ("replicationInterval", "1h")],
        )
        .await?;
    out.first_round.push(c.wait_replica(1, &vol).await?);
    let dev = c.attach(0, &vol).await?;
    write_seq(cfg, &dev, 0, data).await?;
    out.prewarm.push(c.migrate(&cfg.berth, 1, &vol).await?);
    match change {
        Change::Random => write_random(cfg, &dev, data, delta).await?,
        Change::Sequential => {
            // A different 1 MiB-aligned place in the data every round.
            let slots = (data - delta) / MIB;
            let at = (round as u64 * 389 + 17) % slots.max(1) * MIB;
            write_seq(cfg, &dev, at, delta).await?;
        }
    }
    let m = move_volume(c, &vol, 0, 1).await?;
    note!(
        "move {name}: downtime {}, received {} MiB ({}), stage+publish {}",
        fmt_secs(m.downtime),
        m.received / MIB,
        m.method,
        fmt_secs(m.attach)
    );
    out.moves.push(m);
    if change == Change::Random {
        let img = c.nodes[1].volume_image(&vol);
        let secs = scattered_reads(&img, data, delta).await?;
        note!(
            "  {} MiB of scattered 4 KiB QD1 reads on node-b: {}",
            delta / MIB,
            fmt_secs(secs)
        );
        out.scattered.push(secs);
    }
    c.detach(1, &vol).await?;
    c.delete(&vol).await?;
    c.tidy().await;
    note!(
        "  case {name} took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Stop-and-copy: the same volume and writes with no replica anywhere (replicas=1,
/// moveKeepsSource=false), moved to node B.
async fn stop_and_copy(
    cfg: &Cfg,
    c: &TestCluster,
    name: &str,
    size: u64,
    out: &mut Samples,
) -> Result<()> {
    let (data, delta) = (cfg.cli.move_data_gib * GIB, cfg.cli.move_change_mib * MIB);
    let vol = c
        .create(
            name,
            size,
            0,
            &[("replicas", "1"), ("moveKeepsSource", "false")],
        )
        .await?;
    let dev = c.attach(0, &vol).await?;
    write_seq(cfg, &dev, 0, data).await?;
    write_random(cfg, &dev, data, delta).await?;
    let m = move_volume(c, &vol, 0, 1).await?;
    note!(
        "stop-and-copy {name}: downtime {}, received {} MiB ({})",
        fmt_secs(m.downtime),
        m.received / MIB,
        m.method
    );
    out.moves.push(m);
    c.detach(1, &vol).await?;
    c.delete(&vol).await?;
    c.tidy().await;
    Ok(())
}

#[derive(Debug, Default)]
struct FullResult {
    berth: Samples,
    raw: Series,
    /// CPU seconds of this process during the raw copy (both of its threads).
    raw_cpu: Series,
    /// The same copy, written with O_DIRECT.
    raw_direct: Series,
    raw_direct_cpu: Series,
    fill: Series,
}

impl FullResult {
    /// The faster raw copy's median time and CPU: the baseline the move is held to.
    fn best_raw(&self) -> (f64, f64, &'static str) {
        if self.raw_direct.median() < self.raw.median() {
            (
                self.raw_direct.median(),
                self.raw_direct_cpu.median(),
                "direct",
            )
        } else {
            (self.raw.median(), self.raw_cpu.median(), "buffered")
        }
    }
}

/// A `size` volume written in full on node A, then (in alternating order) moved to node B
/// with no replica anywhere, and copied raw over TCP from wherever its image is to the
/// other node's pool.
async fn full_move(
    cfg: &Cfg,
    c: &TestCluster,
    size: u64,
    round: usize,
    out: &mut FullResult,
) -> Result<()> {
    let name = format!("full-{}g-r{round}", size / GIB);
    let vol = c
        .create(
            &name,
            size,
            0,
            &[("replicas", "1"), ("moveKeepsSource", "false")],
        )
        .await?;
    let dev = c.attach(0, &vol).await?;
    out.fill.push(write_seq(cfg, &dev, 0, size).await?);
    c.detach(0, &vol).await?;
    let mut holder = 0;
    for side in order(round) {
        match side {
            Side::Berth => {
                c.attach(0, &vol).await?;
                let m = move_volume(c, &vol, 0, 1).await?;
                note!(
                    "full move {} GiB: {} ({:.0} MiB/s), received {} MiB ({})",
                    size / GIB,
                    fmt_secs(m.downtime),
                    m.received as f64 / MIB as f64 / m.downtime,
                    m.received / MIB,
                    m.method
                );
                out.berth.moves.push(m);
                c.detach(1, &vol).await?;
                holder = 1;
                c.tidy().await;
            }
            Side::Baseline => {
                let src = c.nodes[holder].volume_image(&vol);
                let dir = c.nodes[1 - holder].pool_root().join("bench-raw");
                fs::create_dir_all(&dir)?;
                let dst = dir.join(format!("{vol}.copy"));
                for direct in [false, true] {
                    let (src2, dst2) = (src.clone(), dst.clone());
                    let cpu0 = proc_cpu(std::process::id());
                    let secs = tokio::task::spawn_blocking(move || {
                        raw_tcp_copy(&src2, size, &dst2, direct)
                    })
                    .await
                    .map_err(|e| format!("raw copy task: {e}"))??;
                    let cpu = proc_cpu(std::process::id()) - cpu0;
                    note!(
                        "raw TCP copy {} GiB ({}): {} ({:.0} MiB/s)",
                        size / GIB,
                        if direct { "direct" } else { "buffered" },
                        fmt_secs(secs),
                        size as f64 / MIB as f64 / secs
                    );
                    if direct {
                        out.raw_direct.push(secs);
                        out.raw_direct_cpu.push(cpu);
                    } else {
                        out.raw.push(secs);
                        out.raw_cpu.push(cpu);
                    }
                    fs::remove_file(&dst)?;
                    c.tidy().await;
                }
            }
        }
    }
    c.delete(&vol).await?;
    c.tidy().await;
    Ok(())
}

/// Free bytes of the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir)
        .map(|v| v.blocks_available() * v.fragment_size())
        .unwrap_or(0)
}

fn mib_s(bytes: f64, secs: f64) -> String {
    format!("{:.0} MiB/s", bytes / MIB as f64 / secs)
}

pub(super) async fn bench_move(cfg: &Cfg) -> Result<()> {
    section_header("7. Moving volumes between nodes (issue 3)", Section::Move);
    let sizes: Vec<u64> = cfg.cli.move_full_gib.iter().map(|g| g * GIB).collect();
    let (small, big) = (
        cfg.cli.move_volume_gib * GIB,
        cfg.cli.move_big_volume_gib * GIB,
    );
    let data = cfg.cli.move_data_gib * GIB;
    let largest = sizes.iter().copied().max().unwrap_or(0).max(data);
    // Peak: a full volume on one node plus its copy on the other, plus the pools' own
    // metadata and what the deferred freeing holds back for a moment.
    let need = 2 * largest + 4 * GIB;
    let free = free_bytes(&cfg.root);
    note!(
        "move: {} GiB free under {}; this section needs about {} GiB at its peak",
        free / GIB,
        cfg.root.display(),
        need / GIB
    );
    if free < need {
        bail!(
            "move: {} GiB free under {}, about {} GiB needed; use --workdir elsewhere or smaller --move-full-gib",
            free / GIB,
            cfg.root.display(),
            need / GIB
        );
    }
    let c = TestCluster::start(cfg).await?;
    let runs = cfg.cli.runs;
    let (mut random, mut seq, mut big_random, mut stop) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    let t = Instant::now();
    for round in 0..runs {
        for side in order(round) {
            match side {
                Side::Berth => {
                    prewarmed_move(
                        cfg,
                        &c,
                        &format!("pre-rand-r{round}"),
                        small,
                        Change::Random,
                        round,
                        &mut random,
                    )
                    .await?;
                    prewarmed_move(
                        cfg,
                        &c,
                        &format!("pre-seq-r{round}"),
                        small,
                        Change::Sequential,
                        round,
                        &mut seq,
                    )
                    .await?;
                    prewarmed_move(
                        cfg,
                        &c,
                        &format!("pre-big-r{round}"),
                        big,
                        Change::Random,
                        round,
                        &mut big_random,
                    )
                    .await?;
                }
                Side::Baseline => {
                    stop_and_copy(cfg, &c, &format!("stop-r{round}"), small, &mut stop).await?;
                }
            }
        }
        note!(
            "move: cut-over round {}/{runs} done ({:.0} s)",
            round + 1,
            t.elapsed().as_secs_f64()
        );
    }
    let mut full: Vec<FullResult> = sizes.iter().map(|_| FullResult::default()).collect();
    let full_runs = cfg.cli.move_full_runs.unwrap_or(runs);
    let largest_runs = cfg.cli.move_largest_full_runs.unwrap_or(full_runs);
    let runs_of = |size: u64| {
        if Some(size) == sizes.iter().copied().max() {
            largest_runs
        } else {
            full_runs
        }
    };
    for round in 0..full_runs.max(largest_runs) {
        for (i, &size) in sizes.iter().enumerate() {
            if round < runs_of(size) {
                full_move(cfg, &c, size, round, &mut full[i]).await?;
            }
        }
        note!(
            "move: full-move round {}/{full_runs} done ({:.0} s)",
            round + 1,
            t.elapsed().as_secs_f64()
        );
    }
    drop(c);

    // Item 1 and 3: cut-over downtime.
    let gib = |b: u64| b / GIB;
    let mut t1 = Table::new(&[
        "cut-over (ControllerUnpublish on A returned → ControllerPublish on B returned)",
        "median",
        "worst",
        "baseline",
        "baseline median",
        "ratio",
        "target",
        "met?",
    ]);
    let stop_dt = stop.series(|m| m.downtime);
    let rnd_dt = random.series(|m| m.downtime);
    let seq_dt = seq.series(|m| m.downtime);
    let big_dt = big_random.series(|m| m.downtime);
    for (label, s) in [
        (
            format!(
                "{} GiB volume, {} GiB data, pre-warmed, then {} MiB random 4 KiB changes",
                gib(small),
                gib(data),
                cfg.cli.move_change_mib
            ),
            &rnd_dt,
        ),
        (
            format!(
                "{} GiB volume, {} GiB data, pre-warmed, then {} MiB sequential changes",
                gib(small),
                gib(data),
                cfg.cli.move_change_mib
            ),
            &seq_dt,
        ),
    ] {
        t1.row(vec![
            label,
            fmt_secs(s.median()),
            fmt_secs(s.p99()),
            "stop-and-copy (no replica)".into(),
            fmt_secs(stop_dt.median()),
            fmt_ratio(s.median() / stop_dt.median()),
            "< 2 s".into(),
            yes_no(s.median() < 2.0),
        ]);
    }
    t1.row(vec![
        format!(
            "{} GiB volume, same data and {} MiB random changes, pre-warmed",
            gib(big),
            cfg.cli.move_change_mib
        ),
        fmt_secs(big_dt.median()),
        fmt_secs(big_dt.p99()),
        format!("the {} GiB volume's", gib(small)),
        fmt_secs(rnd_dt.median()),
        fmt_ratio(big_dt.median() / rnd_dt.median()),
        "≈ 1× (≤ 1.2×)".into(),
        yes_no(big_dt.median() / rnd_dt.median() <= 1.2),
    ]);
    t1.row(vec![
        format!(
            "stop-and-copy: {} GiB volume, {} GiB data + {} MiB random changes, no replica",
            gib(small),
            gib(data),
            cfg.cli.move_change_mib
        ),
        fmt_secs(stop_dt.median()),
        fmt_secs(stop_dt.p99()),
        "—".into(),
        "—".into(),
        "—".into(),
        "—".into(),
        "—".into(),
    ]);
    say("### Cut-over downtime\n");
    t1.print();

    let mut t1b = Table::new(&[
        "case",
        "bytes received (median)",
        "plan method",
        "locate",
        "fence + snapshot",
        "base clone + plan",
        "transfer",
        "promote",
        "settle + publish",
        "NodeStage+NodePublish after",
        "app gap (NodeUnpublish A → NodePublish B)",
        "CPU s: old node / new node / controller",
        "same bytes as scattered QD1 4 KiB reads (fio)",
    ]);
    let mut phase_row = |label: String, sm: &Samples| {
        t1b.row(vec![
            label,
            format!("{:.1} MiB", sm.received() / MIB as f64),
            sm.methods(),
            fmt_secs(sm.phase(|p| p.locate).median()),
            fmt_secs(sm.phase(|p| p.fence).median()),
            fmt_secs(sm.phase(|p| p.plan).median()),
            fmt_secs(sm.phase(|p| p.transfer).median()),
            fmt_secs(sm.phase(|p| p.promote).median()),
            fmt_secs(sm.phase(|p| p.finish).median()),
            fmt_secs(sm.series(|m| m.attach).median()),
            fmt_secs(sm.series(|m| m.app_gap).median()),
            format!(
                "{:.2} / {:.2} / {:.2}",
                sm.series(|m| m.cpu[0]).median(),
                sm.series(|m| m.cpu[1]).median(),
                sm.series(|m| m.cpu[2]).median()
            ),
            fmt_secs(sm.scattered.median()),
        ]);
    };
    phase_row(format!("{} GiB, random changes", gib(small)), &random);
    phase_row(format!("{} GiB, sequential changes", gib(small)), &seq);
    phase_row(format!("{} GiB, random changes", gib(big)), &big_random);
    phase_row(format!("{} GiB stop-and-copy", gib(small)), &stop);
    let full_labels: Vec<String> = sizes
        .iter()
        .map(|s| format!("{} GiB full, no replica", gib(*s)))
        .collect();
    for (l, r) in full_labels.iter().zip(&full) {
        phase_row(l.clone(), &r.berth);
    }
    say("### Where the time of a move goes (medians; from the processes' log timestamps)\n");
    t1b.print();

    // Items 2 and 4: full moves vs the raw TCP copy.
    let mut t2 = Table::new(&[
        "volume (written in full)",
        "rounds",
        "move median",
        "move worst",
        "raw TCP copy median: buffered / direct",
        "move / faster raw",
        "berth end-to-end",
        "berth transfer phase",
        "faster raw TCP",
        "end-to-end / raw",
        "transfer phase / raw",
        "target",
        "met?",
        "CPU s: berth old + new node / raw copy",
    ]);
    for ((size, r), _) in sizes.iter().zip(&full).zip(&full_labels) {
        let mv = r.berth.series(|m| m.downtime);
        let bytes = r.berth.received();
        let xfer = r.berth.phase(|p| p.transfer);
        let e2e_rate = bytes / mv.median();
        let xfer_rate = bytes / xfer.median();
        let (raw, raw_cpu, raw_kind) = r.best_raw();
        let raw_rate = *size as f64 / raw;
        t2.row(vec![
            format!("{} GiB", gib(*size)),
            r.berth.moves.len().to_string(),
            fmt_secs(mv.median()),
            fmt_secs(mv.p99()),
            format!(
                "{} / {}",
                fmt_secs(r.raw.median()),
                fmt_secs(r.raw_direct.median())
            ),
            fmt_ratio(mv.median() / raw),
            mib_s(e2e_rate, 1.0),
            mib_s(xfer_rate, 1.0),
            format!("{} ({raw_kind})", mib_s(raw_rate, 1.0)),
            fmt_ratio(e2e_rate / raw_rate),
            fmt_ratio(xfer_rate / raw_rate),
            "≥ 0.70× of raw".into(),
            yes_no(e2e_rate / raw_rate >= 0.7),
            format!(
                "{:.2} + {:.2} / {:.2}",
                r.berth.series(|m| m.cpu[0]).median(),
                r.berth.series(|m| m.cpu[1]).median(),
                raw_cpu
            ),
        ]);
    }
    say("### Moves without a replica, and transfer throughput against a raw TCP copy\n");
    t2.print();

    let med = |s: &[f64]| fmt_secs(median(s));
    say(&format!(
        "Cluster: `berth certs`, 2 × `berth node --agent-listen 127.0.0.1:PORT --tls-dir ... --pool-size {pool}` \
         (sparse pool image each, on the same disk) and `berth controller --nodes FILE --tls-dir ...`, \
         all on loopback with mutual TLS, berth's default (info) logging. {runs} rounds for the cut-overs \
         (berth cases first in even rounds, stop-and-copy first in odd ones), {full_runs} for the full moves \
         ({largest_runs} for the largest; move and raw copy alternating the same way). Every case uses a fresh block volume created on \
         node A, published there (ControllerPublish, NodeStage, NodePublish), written with fio \
         ({engine}, direct=1) through the device, and moved by the CO's sequence: NodeUnpublish, \
         NodeUnstage, ControllerUnpublish on A, then ControllerPublish on B (timed: the downtime), then \
         NodeStage + NodePublish on B. After each case the volume is deleted and both pools are frozen/thawed \
         and trimmed (untimed).\n\n\
         **Pre-warmed cut-overs:** StorageClass parameters `replicas=2, replicationInterval=1h`; the bench \
         waits for the replication loop's first round (volume still empty; median {first}), writes {data} GiB \
         (1 MiB sequential, iodepth 16) while published on A, runs `berth migrate VOL --to node-b` until it \
         prints `ready` (median {pre}), then changes {chg} MiB while still published — random: 4 KiB writes at \
         distinct random 4 KiB-aligned offsets within the data, iodepth 32; sequential: one {chg} MiB run at a \
         1 MiB-aligned offset that differs per round — and moves the volume. The {big} GiB case holds the same \
         {data} GiB of data (the disk cannot hold {big} GiB twice), so its ratio isolates the cost of the \
         volume's size. **Stop-and-copy baseline:** the same {small} GiB volume, data and random changes with \
         `replicas=1, moveKeepsSource=false`, so nothing is on node B before the move.\n\n\
         **Full moves:** `replicas=1, moveKeepsSource=false`, the whole volume written (fio 1 MiB sequential, \
         median fill time {fills}). **Raw TCP copy baseline:** in this process, a sender thread reads the \
         volume's image file (page cache dropped first) in 4 MiB reads and writes it to a plain TCP socket \
         on 127.0.0.1; a receiver thread writes what arrives, 4 MiB at a time, to a new file in the other \
         node's pool filesystem and fsyncs it; timed from the connection to the fsync. It runs twice per \
         round: writing through the page cache, and with O_DIRECT (as berth writes large chunks); berth is held \
         to the faster of the two medians. No TLS, no hashing, no framing, no durability checkpoints: an upper \
         bound, not a fair peer. Throughput = data bytes received \
         (node B's transfer counters) / time; \"end-to-end\" is the ControllerPublish time, \"transfer phase\" \
         the log-timestamp span from the sender's `sending snapshot` to the receiver's `snapshot received and \
         verified`.\n\n\
         **Phases** (from log timestamps): locate = ControllerPublish sent → controller logs the move; fence + \
         snapshot = → `hand-off: shipping the final snapshot`; base clone + plan = → old node logs `sending \
         snapshot`; transfer = → new node logs `snapshot received and verified`; promote = → controller logs \
         `hand-off: new primary promoted`; settle + publish = → ControllerPublish returns. CPU s = user + \
         system time of each berth process (/proc/PID/stat) across the ControllerPublish. Scattered QD1 \
         reads: after each random-change cut-over, `fio --rw=read:GAP --bs=4k --iodepth=1 --direct=1 \
         --ioengine=psync --size={data}g --io_size={chg}m` on the new node's volume image — the same number of \
         4 KiB blocks as the delta, spread evenly over the data in ascending order, one read at a time, \
         which is how the sender reads a delta's pieces.\n",
        pool = cfg.cli.move_pool_size,
        engine = cfg.cli.fio_engine,
        first = med(&[
            &random.first_round[..],
            &seq.first_round[..],
            &big_random.first_round[..]
        ]
        .concat()),
        pre = med(&[&random.prewarm[..], &seq.prewarm[..]].concat()),
        data = gib(data),
        chg = cfg.cli.move_change_mib,
        big = gib(big),
        small = gib(small),
        fills = full
            .iter()
            .zip(&sizes)
            .map(|(r, s)| format!("{} GiB {}", gib(*s), fmt_secs(r.fill.median())))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    Ok(())
}
