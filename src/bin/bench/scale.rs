//! Section 8: what one CSI call costs as the cluster grows, and what one silent node does to
//! the rest (issue 12).
//!
//! For each node count N of `--scale-nodes`, starts a real cluster on loopback as an operator
//! would: `berth certs`, N `berth node --agent-listen 127.0.0.1:PORT --tls-dir ...` processes
//! with small sparse pools, and one `berth controller --nodes FILE --metrics-listen ...` with
//! a state dir of its own. The last node is the one that will be stopped: every volume under
//! test is created elsewhere (round-robin over the other nodes, as a scheduler's choice
//! reaches CreateVolume: the node as the preferred topology), so it holds none of them.
//!
//! Per round:
//! - healthy: `--scale-volumes` CreateVolume calls one after another, then a
//!   ControllerPublishVolume of each on the node that holds it (in place: no move), each
//!   timed;
//! - one stopped: the last node gets SIGSTOP, the bench waits `--scale-settle-secs` (a
//!   controller that watches its nodes needs to notice), then times `--scale-stopped-volumes`
//!   more CreateVolume calls and ControllerPublishVolume calls of the healthy phase's volumes
//!   (all away from the stopped node), each with a `--scale-deadline-secs` deadline so a hang
//!   counts as an error; then SIGCONT.
//!
//! Agent RPCs per CSI call come from the controller's own counter
//! `berth_agent_requests_total` (summed over all label sets), scraped before and after each
//! batch. A controller that polls its nodes in the background into the same counter would
//! inflate that figure, so the counter's rate over an idle window before each batch is
//! measured too and subtracted (reported as "background").

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
};

use berth::proto::agent::v1::{self as pb, agent_client::AgentClient};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::move_section::{controller_args, free_port, s, spawn_berth};
use super::*;

const TOPOLOGY_KEY: &str = "topology.berth.csi.dev/node";
/// Size of each volume under test: the smallest berth makes is enough, the bench measures
/// the control path only.
const VOLUME_BYTES: u64 = MIB;
/// Idle window before each batch over which the background rate of agent calls is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(5);

struct ScaleNode {
    id: String,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl ScaleNode {
    fn socket(&self) -> PathBuf {
        self.dir.join("csi.sock")
    }
    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().map_or(0, Child::id) as i32)
    }
}

/// N nodes and a controller under `dir`; dropping it resumes a stopped node, kills every
/// process and undoes every mount and loop device under `dir`.
struct ScaleCluster {
    dir: PathBuf,
    nodes: Vec<ScaleNode>,
    controller: Option<Child>,
    ctl: Option<ControllerClient<Channel>>,
    agents: Vec<AgentClient<Channel>>,
    metrics_port: u16,
}

impl ScaleCluster {
    async fn start(cfg: &Cfg, n: usize) -> Result<ScaleCluster> {
        let dir = cfg.root.join(format!("scale-{n}"));
        fs::create_dir_all(&dir)?;
        let certs = dir.join("certs");
        let ids: Vec<String> = (0..n).map(|i| format!("node-{i:02}")).collect();
        let mut args = vec!["certs".to_string(), "--out".into(), s(&certs)];
        args.extend(ids.iter().cloned());
        args.push("controller".into());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(p(&cfg.berth), &a).await?;
        let nodes = ids
            .into_iter()
            .map(|id| ScaleNode {
                dir: dir.join(&id),
                id,
                port: 0,
                child: None,
            })
            .collect();
        // Built before the processes start, so that an error half-way still cleans up.
        let mut c = ScaleCluster {
            dir: dir.clone(),
            nodes,
            controller: None,
            ctl: None,
            agents: Vec::new(),
            metrics_port: 0,
        };
        let mut nodes_file = String::new();
        for node in &mut c.nodes {
            fs::create_dir_all(&node.dir)?;
            let (log, socket, endpoint) =
                (node.dir.join("berth.log"), node.socket(), node.endpoint());
            let (child, port) =
                spawn_on_free_port(|port| {
                    let args = vec![
                        "node".to_string(),
                        "--endpoint".into(),
                        endpoint.clone(),
                        "--state-dir".into(),
                        s(node.dir.join("state")),
                        "--node-id".into(),
                        node.id.clone(),
                        "--pool-size".into(),
                        cfg.cli.scale_pool_size.clone(),
                        "--agent-listen".into(),
                        format!("127.0.0.1:{port}"),
                        "--tls-dir".into(),
                        s(certs.join(&node.id)),
                    ];
                    let (log, socket, endpoint) = (&log, &socket, &endpoint);
                    async move {
                        spawn_berth(&cfg.berth, &args, log, socket, endpoint, Some(port)).await
                    }
                })
                .await?;
            node.child = Some(child);
            node.port = port;
            nodes_file.push_str(&format!("{} 127.0.0.1:{port}\n", node.id));
        }
        fs::write(dir.join("nodes"), nodes_file)?;
        let csock = dir.join("controller.sock");
        let cend = format!("unix://{}", csock.display());
        let (child, port) = spawn_on_free_port(|port| {
            let mut args = controller_args(&cend, &dir, &certs);
            args.extend(["--metrics-listen".into(), format!("127.0.0.1:{port}")]);
            let (log, csock, cend) = (dir.join("controller.log"), &csock, &cend);
            async move { spawn_berth(&cfg.berth, &args, &log, csock, cend, Some(port)).await }
        })
        .await?;
        c.controller = Some(child);
        c.metrics_port = port;
        c.ctl = Some(ControllerClient::new(berth::client::connect(&cend).await?));
        let tls = berth::tls::TlsMaterial::load(&certs.join("controller"))
            .map_err(|e| format!("controller TLS material: {e}"))?;
        for node in &c.nodes {
            let ch = berth::agent::channel(&node.id, &format!("127.0.0.1:{}", node.port), &tls)
                .map_err(|e| format!("agent channel: {e}"))?;
            c.agents.push(AgentClient::new(ch));
        }
        Ok(c)
    }

    fn ctl(&self) -> ControllerClient<Channel> {
        self.ctl.clone().expect("controller client")
    }

    fn stopped(&self) -> usize {
        self.nodes.len() - 1
    }

    /// The controller's `berth_agent_requests_total`, summed over every label set.
    fn agent_requests(&self) -> Result<f64> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        conn.read_to_string(&mut body)?;
        if !body.starts_with("HTTP/1.1 200") {
            bail!(
                "GET /metrics: {}",
                body.lines().next().unwrap_or("no answer")
            );
        }
        Ok(body
            .lines()
            .filter(|l| {
                l.strip_prefix("berth_agent_requests_total")
                    .is_some_and(|r| r.starts_with(['{', ' ']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Agent calls per second while no CSI call is in flight.
    async fn background_rate(&self) -> Result<f64> {
        let before = self.agent_requests()?;
        tokio::time::sleep(IDLE_WINDOW).await;
        Ok((self.agent_requests()? - before) / IDLE_WINDOW.as_secs_f64())
    }

    /// Which node holds each of `vols` as its primary, asked of the nodes directly (not
    /// through the controller, whose counter is being read); the stopped node is not asked.
    async fn holders(&self, vols: &[String], skip: Option<usize>) -> Result<Vec<usize>> {
        let mut at = std::collections::HashMap::new();
        for (i, agent) in self.agents.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let inv = agent
                .clone()
                .inventory(pb::InventoryRequest {})
                .await
                .map_err(|e| format!("Inventory of {}: {e}", self.nodes[i].id))?
                .into_inner();
            for v in inv.volumes {
                if v.role == pb::Role::Primary as i32 {
                    at.insert(v.volume_id, i);
                }
            }
        }
        vols.iter()
            .map(|v| {
                at.get(v)
                    .copied()
                    .ok_or_else(|| format!("no node holds volume {v} as primary").into())
            })
            .collect()
    }
}

impl Drop for ScaleCluster {
    fn drop(&mut self) {
        self.ctl = None;
        self.agents.clear();
        for n in &self.nodes {
            let _ = kill(n.pid(), Signal::SIGCONT);
        }
        stop_child(&mut self.controller);
        for n in &mut self.nodes {
            stop_child(&mut n.child);
        }
        cleanup_tree(&self.dir);
    }
}

/// Starts a process listening on a port picked free; picks another and retries when some
/// other process took the port in between (tests and builds share this machine).
async fn spawn_on_free_port<F, Fut>(mut spawn: F) -> Result<(Child, u16)>
where
    F: FnMut(u16) -> Fut,
    Fut: std::future::Future<Output = Result<Child>>,
{
    let mut attempt = 0;
    loop {
        let port = free_port()?;
        match spawn(port).await {
            Ok(child) => return Ok((child, port)),
            Err(e) if attempt < 5 && e.to_string().contains("Address already in use") => {
                note!("scale: port {port} was taken meanwhile; another");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

fn create_on(name: &str, node: &str) -> csi::CreateVolumeRequest {
    let mut req = create_req(name, VOLUME_BYTES, block_cap());
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: [(TOPOLOGY_KEY.to_string(), node.to_string())].into(),
        }],
    });
    req
}

fn publish_on(vol: &str, node: &str) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(block_cap()),
        readonly: false,
        ..Default::default()
    }
}

/// One timed batch of CSI calls: latencies of the calls that succeeded, the errors, and the
/// controller's agent calls during the batch less its background rate.
#[derive(Default)]
struct Batch {
    ok: Vec<f64>,
    errors: Vec<String>,
    /// Time until each error (the deadline for a call that did not answer).
    failed: Vec<f64>,
    agent_calls: f64,
    background: f64,
}

impl Batch {
    fn per_call(&self) -> f64 {
        self.agent_calls / (self.ok.len() + self.errors.len()) as f64
    }
}

/// CreateVolume of each `(name, node)`, placed on that node, in order: the created ids.
async fn create_batch(
    c: &ScaleCluster,
    names: &[(String, String)],
    deadline: Duration,
) -> Result<(Batch, Vec<Option<String>>)> {
    batch(c, names, deadline, |(name, node)| {
        let mut ctl = c.ctl();
        let req = create_on(name, node);
        async move {
            let v = ctl.create_volume(req).await?.into_inner().volume;
            Ok(v.map(|v| v.volume_id).unwrap_or_default())
        }
    })
    .await
}

/// Runs `call` for each item in order, each under `deadline`.
async fn batch<T, F, Fut>(
    c: &ScaleCluster,
    items: &[T],
    deadline: Duration,
    mut call: F,
) -> Result<(Batch, Vec<Option<String>>)>
where
    F: FnMut(&T) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<String, tonic::Status>>,
{
    let background = c.background_rate().await?;
    let before = c.agent_requests()?;
    let t0 = Instant::now();
    let mut b = Batch {
        background,
        ..Batch::default()
    };
    let mut out = Vec::new();
    for item in items {
        let t = Instant::now();
        match tokio::time::timeout(deadline, call(item)).await {
            Ok(Ok(v)) => {
                b.ok.push(t.elapsed().as_secs_f64());
                out.push(Some(v));
            }
            Ok(Err(e)) => {
                b.failed.push(t.elapsed().as_secs_f64());
                b.errors
                    .push(format!("{:?}: {}", e.code(), e.message().trim()));
                out.push(None);
            }
            Err(_) => {
                b.failed.push(t.elapsed().as_secs_f64());
                b.errors
                    .push(format!("no answer within {} s", deadline.as_secs()));
                out.push(None);
            }
        }
    }
    let spent = t0.elapsed().as_secs_f64();
    b.agent_calls = c.agent_requests()? - before - background * spent;
    Ok((b, out))
}

/// Every round's figures for one (N, phase).
#[derive(Default)]
struct PhaseResult {
    create: Series,
    publish: Series,
    create_calls: Series,
    publish_calls: Series,
    background: Series,
    /// Time until each error, creates and publishes together.
    failed: Vec<f64>,
    create_errors: usize,
    publish_errors: usize,
    create_attempts: usize,
    publish_attempts: usize,
    /// Distinct error messages with their counts.
    messages: std::collections::BTreeMap<String, usize>,
}

impl PhaseResult {
    fn add(&mut self, create: &Batch, publish: &Batch) {
        self.create.push_round(&create.ok);
        self.publish.push_round(&publish.ok);
        self.create_calls.push(create.per_call());
        self.publish_calls.push(publish.per_call());
        self.background
            .push_round(&[create.background, publish.background]);
        self.failed.extend(&create.failed);
        self.failed.extend(&publish.failed);
        self.create_errors += create.errors.len();
        self.publish_errors += publish.errors.len();
        self.create_attempts += create.ok.len() + create.errors.len();
        self.publish_attempts += publish.ok.len() + publish.errors.len();
        for (what, b) in [
            ("CreateVolume", create),
            ("ControllerPublishVolume", publish),
        ] {
            for e in &b.errors {
                *self.messages.entry(format!("{what}: {e}")).or_default() += 1;
            }
        }
    }
}

/// One round on a running cluster: healthy, then one node stopped.
async fn scale_round(
    cfg: &Cfg,
    c: &ScaleCluster,
    round: usize,
    healthy: &mut PhaseResult,
    stopped: &mut PhaseResult,
) -> Result<()> {
    let n = c.nodes.len();
    let victim = c.stopped();
    let deadline = Duration::from_secs(cfg.cli.scale_deadline_secs);
    let target = |i: usize| c.nodes[i % victim].id.clone();
    let mut all = Vec::new();

    let names: Vec<(String, String)> = (0..cfg.cli.scale_volumes)
        .map(|i| (format!("scale-{n}-r{round}-h{i}"), target(i)))
        .collect();
    let (create, ids) = create_batch(c, &names, deadline).await?;
    if !create.errors.is_empty() {
        bail!(
            "scale: {} of {} CreateVolume calls failed with every node up; first: {}",
            create.errors.len(),
            names.len(),
            create.errors[0]
        );
    }
    let vols: Vec<String> = ids.into_iter().flatten().collect();
    all.extend(vols.iter().cloned());
    let at = c.holders(&vols, None).await?;
    if at.contains(&victim) {
        bail!(
            "scale: the controller placed a volume on {}, the node to be stopped, despite the preferred topology",
            c.nodes[victim].id
        );
    }
    let pubs: Vec<(String, String)> = vols
        .iter()
        .zip(&at)
        .map(|(v, &i)| (v.clone(), c.nodes[i].id.clone()))
        .collect();
    let (publish, _) = batch(c, &pubs, deadline, |(vol, node)| {
        let mut ctl = c.ctl();
        let req = publish_on(vol, node);
        async move {
            ctl.controller_publish_volume(req).await?;
            Ok(String::new())
        }
    })
    .await?;
    healthy.add(&create, &publish);
    // Back to unpublished, so the stopped phase publishes them afresh (untimed).
    for (vol, node) in &pubs {
        c.ctl()
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: vol.clone(),
                node_id: node.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("ControllerUnpublishVolume {vol}: {e}"))?;
    }
    note!(
        "scale: N={n} round {}: healthy create p50 {}, publish p50 {}, agent calls/create {:.1}",
        round + 1,
        fmt_secs(median(&create.ok)),
        fmt_secs(median(&publish.ok)),
        create.per_call()
    );

    note!(
        "scale: N={n}: SIGSTOP {} (pid {}), waiting {} s",
        c.nodes[victim].id,
        c.nodes[victim].pid(),
        cfg.cli.scale_settle_secs
    );
    kill(c.nodes[victim].pid(), Signal::SIGSTOP)?;
    let result = async {
        tokio::time::sleep(Duration::from_secs(cfg.cli.scale_settle_secs)).await;
        let names: Vec<(String, String)> = (0..cfg.cli.scale_stopped_volumes)
            .map(|i| (format!("scale-{n}-r{round}-s{i}"), target(i)))
            .collect();
        let (create, ids) = create_batch(c, &names, deadline).await?;
        let pubs: Vec<(String, String)> = pubs
            .iter()
            .take(cfg.cli.scale_stopped_volumes)
            .cloned()
            .collect();
        let (publish, _) = batch(c, &pubs, deadline, |(vol, node)| {
            let mut ctl = c.ctl();
            let req = publish_on(vol, node);
            async move {
                ctl.controller_publish_volume(req).await?;
                Ok(String::new())
            }
        })
        .await?;
        Ok::<_, BoxError>((create, ids, publish, names))
    }
    .await;
    kill(c.nodes[victim].pid(), Signal::SIGCONT)?;
    let (create, ids, publish, names) = result?;
    note!(
        "scale: N={n} round {}: one stopped: {} of {} creates and {} of {} publishes failed",
        round + 1,
        create.errors.len(),
        names.len(),
        publish.errors.len(),
        publish.ok.len() + publish.errors.len()
    );
    stopped.add(&create, &publish);
    all.extend(ids.into_iter().flatten());
    // A create that timed out may still have made its volume: delete by name's id as well.
    all.extend(
        names
            .iter()
            .map(|(name, _)| berth::storage::model::VolumeId::for_name(name).to_string()),
    );
    all.sort();
    all.dedup();
    cleanup_volumes(c, &pubs, &all).await;
    Ok(())
}

/// Unpublishes and deletes what a round made, once the stopped node is back (untimed).
async fn cleanup_volumes(c: &ScaleCluster, published: &[(String, String)], vols: &[String]) {
    let deadline = Duration::from_secs(120);
    for (vol, node) in published {
        let req = csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: node.clone(),
            ..Default::default()
        };
        match tokio::time::timeout(deadline, c.ctl().controller_unpublish_volume(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => note!("scale: ControllerUnpublishVolume {vol}: {e}"),
            Err(_) => note!("scale: ControllerUnpublishVolume {vol}: no answer in 120 s"),
        }
    }
    for vol in vols {
        let req = csi::DeleteVolumeRequest {
            volume_id: vol.clone(),
            ..Default::default()
        };
        match tokio::time::timeout(deadline, c.ctl().delete_volume(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => note!("scale: DeleteVolume {vol}: {e}"),
            Err(_) => note!("scale: DeleteVolume {vol}: no answer in 120 s"),
        }
    }
}

pub(super) async fn bench_scale(cfg: &Cfg) -> Result<()> {
    section_header(
        "8. Cost of a CSI call by cluster size, and one stopped node (issue 12)",
        Section::Scale,
    );
    let counts = &cfg.cli.scale_nodes;
    if counts.iter().any(|&n| n < 2) {
        bail!("--scale-nodes: every count must be at least 2 (one node is stopped)");
    }
    let mut results: Vec<(usize, PhaseResult, PhaseResult)> = Vec::new();
    for &n in counts {
        let t = Instant::now();
        note!("scale: starting {n} nodes and a controller");
        let c = ScaleCluster::start(cfg, n).await?;
        note!("scale: N={n} up in {:.0} s", t.elapsed().as_secs_f64());
        let (mut healthy, mut stopped) = (PhaseResult::default(), PhaseResult::default());
        for round in 0..cfg.cli.runs {
            scale_round(cfg, &c, round, &mut healthy, &mut stopped).await?;
        }
        drop(c);
        note!("scale: N={n} done in {:.0} s", t.elapsed().as_secs_f64());
        for (label, r) in [("healthy", &healthy), ("one stopped", &stopped)] {
            note!(
                "scale: N={n} {label}: create p50 {} p99 {}, publish p50 {} p99 {}, agent calls/create {:.1}, /publish {:.1}, errors {} + {}",
                fmt_secs(r.create.median()),
                fmt_secs(r.create.p99()),
                fmt_secs(r.publish.median()),
                fmt_secs(r.publish.p99()),
                r.create_calls.median(),
                r.publish_calls.median(),
                r.create_errors,
                r.publish_errors
            );
        }
        results.push((n, healthy, stopped));
    }

    let mut t = Table::new(&[
        "nodes",
        "phase",
        "create p50",
        "create p99",
        "publish p50",
        "publish p99",
        "agent calls / create",
        "agent calls / publish",
        "background agent calls / s",
        "errors (create + publish, of attempts)",
        "time to error p50 / max",
        "create p50 / 2 nodes",
        "publish p50 / 2 nodes",
    ]);
    let base = results.iter().find(|(n, ..)| *n == 2).map(|(_, h, s)| {
        [
            (h.create.median(), h.publish.median()),
            (s.create.median(), s.publish.median()),
        ]
    });
    for (n, healthy, stopped) in &results {
        for (k, (label, r)) in [("healthy", healthy), ("one stopped", stopped)]
            .into_iter()
            .enumerate()
        {
            let ratio = |x: f64, b: Option<f64>| b.map_or("—".into(), |b| fmt_ratio(x / b));
            t.row(vec![
                n.to_string(),
                label.into(),
                fmt_secs(r.create.median()),
                fmt_secs(r.create.p99()),
                fmt_secs(r.publish.median()),
                fmt_secs(r.publish.p99()),
                format!("{:.1}", r.create_calls.median()),
                format!("{:.1}", r.publish_calls.median()),
                format!("{:.1}", r.background.median()),
                format!(
                    "{} + {} of {} + {}",
                    r.create_errors, r.publish_errors, r.create_attempts, r.publish_attempts
                ),
                format!(
                    "{} / {}",
                    fmt_secs(median(&r.failed)),
                    fmt_secs(percentile(&r.failed, 100.0))
                ),
                ratio(r.create.median(), base.map(|b| b[k].0)),
                ratio(r.publish.median(), base.map(|b| b[k].1)),
            ]);
        }
    }
    t.print();
    let mut errors = String::new();
    for (n, _, stopped) in &results {
        for (m, count) in &stopped.messages {
            errors.push_str(&format!("- N={n}, {count}×: {m}\n"));
        }
    }
    if !errors.is_empty() {
        say(&format!(
            "Errors while one node was stopped (all on volumes away from it):\n\n{errors}"
        ));
    }
    say(&format!(
        "Cluster per N: `berth certs`, N × `berth node --agent-listen 127.0.0.1:PORT --tls-dir ... \
         --pool-size {pool}` (sparse pool image each) and `berth controller --nodes FILE --tls-dir ... \
         --state-dir DIR --metrics-listen 127.0.0.1:PORT`, all on loopback with mutual TLS. {runs} \
         round(s) per N. Healthy: {vols} CreateVolume calls ({mib} MiB block volumes, preferred \
         topology = one of the first N−1 nodes round-robin), one after another, then a \
         ControllerPublishVolume of each on the node that holds it (no move). One stopped: SIGSTOP \
         of the last node (holding none of the volumes), {settle} s wait, {svols} more CreateVolume \
         calls placed the same way and ControllerPublishVolume of {svols} of the healthy phase's \
         volumes (unpublished in between), each call with a {dl} s client deadline (a call past it \
         counts as an error); SIGCONT after. p50: median over rounds of each round's median; p99: \
         nearest rank over all calls that succeeded; errors are not in them but counted, with the time each took to fail. Agent calls per CSI call: the controller's \
         `berth_agent_requests_total` (all labels) across the batch, less the background rate \
         (the same counter's rate over a {idle} s idle window just before the batch, times the \
         batch's duration), divided by the calls made.\n",
        pool = cfg.cli.scale_pool_size,
        runs = cfg.cli.runs,
        vols = cfg.cli.scale_volumes,
        mib = VOLUME_BYTES / MIB,
        settle = cfg.cli.scale_settle_secs,
        svols = cfg.cli.scale_stopped_volumes,
        dl = cfg.cli.scale_deadline_secs,
        idle = IDLE_WINDOW.as_secs(),
    ));
    Ok(())
}
