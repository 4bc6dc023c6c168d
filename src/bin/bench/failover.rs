//! Section 9: a node dies under a replicated volume (issue 13).
//!
//! Each run starts a fresh two-node cluster on loopback as an operator would (`berth certs`,
//! two `berth node --agent-listen 127.0.0.1:PORT --tls-dir ...`, `berth controller --nodes
//! FILE ...`), all at the default lease timings. A `replicas: "2"`, `replicationInterval:
//! "5s"` block volume is published on node-a and written (4 KiB synced writes, one after
//! another); once a replication round cut an interval after the writer started has
//! shipped (the steady state), and a further
//! pause that differs per run (so the kills fall at different points of the replication
//! cycle), node-a's berth process gets SIGKILL. The host lives on, as does the writer.
//!
//! From the kill, the bench retries ControllerPublishVolume on node-b every 100 ms while it
//! answers UNAVAILABLE or ABORTED (as a CO retries), then NodeStageVolume there the same
//! way, and times:
//! - kill → the writer's first failed write on node-a (the self-fence);
//! - kill → the placement record shows the failover (the controller's state dir, read
//!   every 20 ms);
//! - kill → ControllerPublishVolume and NodeStageVolume on node-b both done;
//! - the RPO: the kill's time less the time the snapshot the volume failed over from was
//!   cut (node-a's snapshot record, to the nanosecond).

use std::{
    os::unix::fs::{FileExt, OpenOptionsExt},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use super::move_section::{free_port, node_args, s, spawn_berth, start_controller};
use super::*;

const NODES: [&str; 2] = ["node-a", "node-b"];
const VOLUME_BYTES: u64 = 256 * MIB;
const INTERVAL_SECONDS: u64 = 5;
const BLOCK: u64 = 4096;

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64
}

struct FailoverNode {
    id: &'static str,
    dir: PathBuf,
    child: Option<Child>,
}

impl FailoverNode {
    fn socket(&self) -> PathBuf {
        self.dir.join("csi.sock")
    }
    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    fn co_path(&self, name: &str) -> PathBuf {
        self.dir.join("k8s").join(name)
    }
}

/// A controller and two nodes under `dir`; dropping it stops the processes and undoes
/// every mount and loop device under `dir`.
struct FailoverCluster {
    dir: PathBuf,
    nodes: Vec<FailoverNode>,
    controller: Option<Child>,
    ctl: Option<ControllerClient<Channel>>,
    csi: Vec<NodeClient<Channel>>,
    /// Set when dropped: a writer that was never fenced stops then.
    stop_writer: Arc<AtomicBool>,
}

impl FailoverCluster {
    async fn start(cfg: &Cfg, round: usize) -> Result<FailoverCluster> {
        let dir = cfg.root.join(format!("failover-{round}"));
        fs::create_dir_all(&dir)?;
        let certs = dir.join("certs");
        let mut args = vec!["certs".to_string(), "--out".into(), s(&certs)];
        args.extend(NODES.iter().map(|n| n.to_string()));
        args.push("controller".into());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(p(&cfg.berth), &a).await?;
        // Built before the processes start, so that an error half-way still cleans up.
        let mut c = FailoverCluster {
            dir: dir.clone(),
            nodes: NODES
                .iter()
                .map(|&id| FailoverNode {
                    id,
                    dir: dir.join(id),
                    child: None,
                })
                .collect(),
            controller: None,
            ctl: None,
            csi: Vec::new(),
            stop_writer: Arc::default(),
        };
        let ports = [free_port()?, free_port()?];
        let nodes_file: String = NODES
            .iter()
            .zip(ports)
            .map(|(id, port)| format!("{id} 127.0.0.1:{port}\n"))
            .collect();
        fs::write(dir.join("nodes"), nodes_file)?;
        for (n, port) in c.nodes.iter_mut().zip(ports) {
            fs::create_dir_all(&n.dir)?;
            let args = node_args(n.id, n.endpoint(), &n.dir, "4Gi", port, &certs);
            let log = n.dir.join("berth.log");
            n.child = Some(
                spawn_berth(
                    &cfg.berth,
                    &args,
                    &log,
                    &n.socket(),
                    &n.endpoint(),
                    Some(port),
                )
                .await?,
            );
            c.csi.push(NodeClient::new(
                berth::client::connect(&n.endpoint()).await?,
            ));
        }
        let (controller, ctl) = start_controller(&cfg.berth, &dir, &certs).await?;
        c.controller = Some(controller);
        c.ctl = Some(ctl);
        Ok(c)
    }

    fn ctl(&self) -> ControllerClient<Channel> {
        self.ctl.clone().expect("controller client")
    }

    /// The volume's placement record, as the controller last wrote it.
    fn record(&self, vol: &str) -> Result<serde_json::Value> {
        let path = self
            .dir
            .join("controller-state/placement")
            .join(format!("{vol}.json"));
        let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path)?)?;
        Ok(v["record"].clone())
    }

    /// When node `i` cut shipping snapshot `id`, unix nanoseconds (its snapshot record).
    fn cut(&self, i: usize, id: &str) -> Option<i64> {
        let path = self.nodes[i]
            .dir
            .join("state/pool/berth/snapshots")
            .join(format!("{id}.json"));
        let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(path).ok()?).ok()?;
        v["created_unix_nanos"].as_i64()
    }

    fn staging(&self, i: usize, vol: &str) -> String {
        s(self.nodes[i].co_path(&format!("{vol}/staging")))
    }

    async fn publish(&self, i: usize, vol: &str) -> std::result::Result<(), tonic::Status> {
        self.ctl()
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: vol.into(),
                node_id: self.nodes[i].id.into(),
                volume_capability: Some(block_cap()),
                readonly: false,
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn stage(&self, i: usize, vol: &str) -> std::result::Result<(), tonic::Status> {
        self.csi[i]
            .clone()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: self.staging(i, vol),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    /// Stage + publish on node `i` of a volume published there; the device path.
    async fn node_publish(&self, i: usize, vol: &str) -> Result<PathBuf> {
        self.stage(i, vol)
            .await
            .map_err(|e| format!("NodeStageVolume on {}: {e}", self.nodes[i].id))?;
        let target = self.nodes[i].co_path(&format!("{vol}/target"));
        self.csi[i]
            .clone()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: self.staging(i, vol),
                target_path: s(&target),
                volume_capability: Some(block_cap()),
                readonly: false,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("NodePublishVolume on {}: {e}", self.nodes[i].id))?;
        Ok(target)
    }
}

impl Drop for FailoverCluster {
    fn drop(&mut self) {
        self.stop_writer.store(true, Ordering::Relaxed);
        self.ctl = None;
        self.csi.clear();
        stop_child(&mut self.controller);
        for n in &mut self.nodes {
            stop_child(&mut n.child);
        }
        cleanup_tree(&self.dir);
    }
}

/// Writes 4 KiB blocks one after another, each synced, through `dev` until a write fails
/// or `stop` is set; the time of the first failure is kept.
fn start_writer(dev: &Path, stop: Arc<AtomicBool>) -> Result<Arc<Mutex<Option<Instant>>>> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(dev)
        .map_err(|e| format!("open {}: {e}", dev.display()))?;
    let failed = Arc::new(Mutex::new(None));
    let failed2 = failed.clone();
    std::thread::spawn(move || {
        let block = vec![0x5a_u8; BLOCK as usize];
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            if f.write_all_at(&block, (n % (VOLUME_BYTES / BLOCK)) * BLOCK)
                .is_err()
            {
                *failed2.lock().unwrap() = Some(Instant::now());
                return;
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    Ok(failed)
}

/// What one run measured, seconds.
struct RunResult {
    fenced: Option<f64>,
    recorded: f64,
    attached: f64,
    rpo: f64,
}

async fn failover_run(cfg: &Cfg, run: usize) -> Result<RunResult> {
    let c = FailoverCluster::start(cfg, run).await?;
    let mut req = create_req(&format!("failover-{run}"), VOLUME_BYTES, block_cap());
    let interval = format!("{INTERVAL_SECONDS}s");
    req.parameters = [
        ("replicas".to_string(), "2".to_string()),
        ("replicationInterval".to_string(), interval),
    ]
    .into();
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: [(
                "topology.berth.csi.dev/node".to_string(),
                NODES[0].to_string(),
            )]
            .into(),
        }],
    });
    let vol = create_volume(&mut c.ctl(), req).await?;
    c.publish(0, &vol)
        .await
        .map_err(|e| format!("ControllerPublishVolume on node-a: {e}"))?;
    let dev = c.node_publish(0, &vol).await?;
    let writing_since = unix_nanos();
    let failed = start_writer(&dev, c.stop_writer.clone())?;

    // A round cut an interval after the writer started: the cluster is in its steady
    // state, and the replica has what the writer wrote for a while.
    let steady = writing_since + INTERVAL_SECONDS as i64 * 1_000_000_000;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rec = c.record(&vol)?;
        let shipped = rec["replicas"].as_array().into_iter().flatten().any(|r| {
            r["snapshot"]
                .as_str()
                .and_then(|id| c.cut(0, id))
                .is_some_and(|t| t > steady)
        });
        if shipped {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "no replication round of {vol} within 120 s:\n{}",
                tail(&c.dir.join("controller.log"))
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Kills at different points of the replication cycle, run after run.
    tokio::time::sleep(Duration::from_millis(
        (run as u64 * 1000) % (INTERVAL_SECONDS * 1000),
    ))
    .await;

    let pid = c.nodes[0]
        .child
        .as_ref()
        .map(Child::id)
        .ok_or("node-a is not running")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let killed = Instant::now();
    let killed_unix = unix_nanos();

    let recorded = {
        let path = c
            .dir
            .join("controller-state/placement")
            .join(format!("{vol}.json"));
        tokio::spawn(async move {
            loop {
                let failover = fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .map(|v| v["record"]["failover"].clone())
                    .filter(|f| !f.is_null());
                if let Some(f) = failover {
                    return (killed.elapsed(), f);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let retry = |e: &tonic::Status| {
        matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Aborted)
            && killed.elapsed() < Duration::from_secs(120)
    };
    loop {
        match c.publish(1, &vol).await {
            Ok(()) => break,
            Err(e) if retry(&e) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => bail!("ControllerPublishVolume on node-b: {e}"),
        }
    }
    loop {
        match c.stage(1, &vol).await {
            Ok(()) => break,
            Err(e) if retry(&e) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => bail!("NodeStageVolume on node-b: {e}"),
        }
    }
    let attached = killed.elapsed();
    let (recorded, failover) = tokio::time::timeout(Duration::from_secs(10), recorded)
        .await
        .map_err(|_| "published on node-b, and still no failover in the record")??;
    let snapshot = failover["snapshot"].as_str().unwrap_or_default();
    let cut = c
        .cut(0, snapshot)
        .ok_or_else(|| format!("node-a has no record of snapshot {snapshot:?}"))?;
    let fenced = failed
        .lock()
        .unwrap()
        .map(|t| t.saturating_duration_since(killed).as_secs_f64());
    Ok(RunResult {
        fenced,
        recorded: recorded.as_secs_f64(),
        attached: attached.as_secs_f64(),
        rpo: (killed_unix - cut) as f64 / 1e9,
    })
}

pub(super) async fn bench_failover(cfg: &Cfg) -> Result<()> {
    section_header(
        "9. Node loss and failover: SIGKILL of a primary's node to publish and stage elsewhere (issue 13)",
        Section::Failover,
    );
    let mut results = Vec::new();
    for run in 0..cfg.cli.runs {
        let r = failover_run(cfg, run).await?;
        note!(
            "failover: run {}: fenced {}, recorded {}, published + staged {}, RPO {}",
            run + 1,
            r.fenced.map_or("—".into(), fmt_secs),
            fmt_secs(r.recorded),
            fmt_secs(r.attached),
            fmt_secs(r.rpo)
        );
        results.push(r);
    }
    let mut t = Table::new(&[
        "run",
        "kill → writes fenced on node-a",
        "kill → failover recorded",
        "kill → ControllerPublish + NodeStage done on node-b",
        "RPO (kill − cut of the snapshot failed over from)",
    ]);
    let fenced: Vec<f64> = results.iter().filter_map(|r| r.fenced).collect();
    for (i, r) in results.iter().enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            r.fenced.map_or("not fenced".into(), fmt_secs),
            fmt_secs(r.recorded),
            fmt_secs(r.attached),
            fmt_secs(r.rpo),
        ]);
    }
    let med = |f: fn(&RunResult) -> f64| median(&results.iter().map(f).collect::<Vec<_>>());
    let attached = med(|r| r.attached);
    t.row(vec![
        "**median**".into(),
        fmt_secs(median(&fenced)),
        fmt_secs(med(|r| r.recorded)),
        format!("**{}**", fmt_secs(attached)),
        fmt_secs(med(|r| r.rpo)),
    ]);
    t.print();
    say(&format!(
        "Storage part at most 15 s (issue 13's target): {}. Per run: a fresh cluster \
         (`berth certs`, two `berth node --agent-listen 127.0.0.1:PORT --tls-dir ... --pool-size 4Gi`, \
         `berth controller --nodes FILE --tls-dir ... --state-dir DIR`), default lease timings \
         (--lease-period 2s, --lease-duration 10s, --lease-fence-after 6s); a {mib} MiB block \
         volume with replicas 2 and replicationInterval {INTERVAL_SECONDS}s published on node-a and \
         written by 4 KiB O_DSYNC writes every 2 ms; once a replication round cut at least \
         {INTERVAL_SECONDS} s after the writer started has shipped, a pause of (run − 1) s mod {INTERVAL_SECONDS} s, then SIGKILL of node-a's berth \
         (the host, the writer and the fence keeper live on). Then ControllerPublishVolume and \
         NodeStageVolume on node-b, each retried every 100 ms while it answers UNAVAILABLE or \
         ABORTED. Fenced: node-a's writer's first failed write. Recorded: the placement record \
         (read every 20 ms) shows the failover. RPO: kill time less node-a's record of when \
         the snapshot the volume failed over from was cut. Not included: Kubernetes noticing \
         the pod's node and rescheduling it, the kubelet's mount and the database's own \
         recovery.\n",
        yes_no(attached <= 15.0),
        mib = VOLUME_BYTES / MIB,
    ));
    Ok(())
}
