//! Starting a berth process: privileges, pool, crash reconciliation, then serving.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Instant};

use crate::{
    agent,
    cluster::{self, Cluster, ClusterHealth},
    error::{Error, Result},
    proto::{
        admin::v1::admin_server::AdminServer,
        csi::v1::{
            controller_server::ControllerServer, group_controller_server::GroupControllerServer,
            identity_server::IdentityServer, snapshot_metadata_server::SnapshotMetadataServer,
        },
    },
    server::{self, Endpoint, Roles},
    service::{Context, DriverInfo, identity::IdentityService},
    storage::{guard::InFlight, node::NodeState, pool::Pool, setup},
    tls::TlsMaterial,
};

/// A node's agent: where it listens, its certificates, and the domain it moves volumes in.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub tls_dir: PathBuf,
    pub domain: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub roles: Roles,
    pub endpoint: Endpoint,
    pub node_id: String,
    pub driver_name: String,
    pub state_dir: PathBuf,
    pub pool: setup::PoolSource,
    pub max_volumes_per_node: Option<u32>,
    pub direct_io: bool,
    pub agent: Option<AgentConfig>,
}

/// `berth controller --nodes FILE`: drives node agents, holds no pool.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub endpoint: Endpoint,
    pub driver_name: String,
    pub node_id: String,
    pub nodes_file: PathBuf,
    pub tls_dir: PathBuf,
    pub domain: String,
}

/// How many volumes a node attaches unless told otherwise. Loop devices are made on demand
/// through /dev/loop-control up to the minor-number space (the `max_loop` module parameter
/// only sets how many exist at boot), so the figure is a policy, not a kernel limit: every
/// attached volume costs a kernel thread, udev events and mount table entries, and 1000
/// keeps one node's share of those bounded. `--max-volumes-per-node` overrides it.
const DEFAULT_MAX_VOLUMES: u32 = 1000;

/// Builds the shared context: pool up, records reconciled. Separate from [`run`] so tests
/// and benchmarks can build it without serving.
/// The programs berth runs, and the Debian package each comes from.
const TOOLS: &[(&str, &str)] = &[
    ("losetup", "util-linux"),
    ("blkid", "util-linux"),
    ("fsfreeze", "util-linux"),
    ("mount", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
    ("resize2fs", "e2fsprogs"),
    ("mkfs.xfs", "xfsprogs"),
    ("xfs_growfs", "xfsprogs"),
    ("xfs_io", "xfsprogs"),
];

/// Fails at start-up, naming the packages to install, rather than at the first RPC that
/// needs a missing tool.
fn check_tools() -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin"].map(PathBuf::from))
        .collect();
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| !dirs.iter().any(|d| d.join(tool).is_file()))
        .map(|&(_, pkg)| pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::PoolUnavailable(format!(
            "required tools are missing; install: apt-get install {}",
            missing.join(" ")
        )))
    }
}

pub async fn prepare(cfg: &Config) -> Result<Arc<Context>> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::PoolUnavailable(
            "berth must run as root: it creates loop devices, formats and mounts filesystems (as every CSI node plugin does)".into(),
        ));
    }
    check_tools()?;
    let root = setup::prepare(&cfg.state_dir, &cfg.pool).await?;
    let pool = Arc::new(Pool::open(&root).await?);
    let node = Arc::new(NodeState::open(
        &cfg.state_dir,
        pool.clone(),
        cfg.direct_io,
    )?);
    // Each role repairs only what it owns: a node process must never discard a volume a
    // live controller is half-way through creating. The node goes first: it thaws
    // filesystems a crash left frozen, which applications are blocked on, and that must not
    // wait for (or be skipped by a failure of) the pool's repairs.
    if cfg.roles.node {
        let n = node.reconcile().await?;
        if n > 0 {
            tracing::info!(repaired = n, "node state reconciled after an unclean stop");
        }
    }
    // The pool's owner repairs it: the controller of a single node, or the agent of a
    // cluster node.
    if cfg.roles.controller || cfg.agent.is_some() {
        let n = pool.reconcile()?;
        if n > 0 {
            tracing::info!(repaired = n, "pool reconciled after an unclean stop");
        }
    }
    Ok(Arc::new(Context {
        info: DriverInfo {
            name: cfg.driver_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            node_id: cfg.node_id.clone(),
            max_volumes_per_node: cfg.max_volumes_per_node.unwrap_or(DEFAULT_MAX_VOLUMES),
            topology_domain: cfg.agent.as_ref().map(|a| a.domain.clone()),
        },
        pool,
        node,
        inflight: InFlight::default(),
        state_dir: cfg.state_dir.clone(),
    }))
}

pub async fn run(cfg: Config) -> Result<()> {
    let started = Instant::now();
    // Read before touching the pool: bad TLS material is a configuration error to report
    // at once.
    let tls = cfg
        .agent
        .as_ref()
        .map(|a| TlsMaterial::load(&a.tls_dir))
        .transpose()?;
    let ctx = prepare(&cfg).await?;
    tracing::info!(
        node.id = %cfg.node_id,
        pool = %ctx.pool.root().display(),
        reflink = ctx.pool.reflink(),
        startup_ms = started.elapsed().as_millis() as u64,
        "berth ready"
    );
    let shutdown = server::shutdown_channel();
    let csi = server::serve(
        server::csi_router(ctx.clone(), cfg.roles),
        &cfg.endpoint,
        shutdown.clone(),
    );
    match (cfg.agent, tls) {
        (Some(a), Some(tls)) => {
            let agent = agent::serve(ctx, a.listen, tls, server::stopped(shutdown));
            let (c, a) = tokio::join!(csi, agent);
            c.and(a)
        }
        _ => csi.await,
    }
}

/// Runs the cluster controller: CSI Controller, GroupController and berth's Admin API on
/// the endpoint, replication in the background. Needs no root: it touches no storage.
pub async fn run_cluster(cfg: ClusterConfig) -> Result<()> {
    let tls = TlsMaterial::load(&cfg.tls_dir)?;
    let cluster = Arc::new(Cluster::load(&cfg.nodes_file, &tls, cfg.domain.clone())?);
    tracing::info!(nodes = ?cluster.node_ids().collect::<Vec<_>>(), domain = %cfg.domain, "berth cluster controller ready");
    let info = DriverInfo {
        name: cfg.driver_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        node_id: cfg.node_id.clone(),
        max_volumes_per_node: DEFAULT_MAX_VOLUMES,
        topology_domain: Some(cfg.domain.clone()),
    };
    let controller = cluster::controller::ClusterController::new(cluster.clone());
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(
            info,
            Arc::new(ClusterHealth(cluster.clone())),
            true,
        )))
        .add_service(ControllerServer::new(controller.clone()))
        .add_service(GroupControllerServer::new(controller))
        .add_service(SnapshotMetadataServer::new(
            cluster::metadata::ClusterMetadata::new(cluster.clone()),
        ))
        .add_service(AdminServer::new(cluster::admin::AdminService::new(
            cluster.clone(),
        )));
    let shutdown = server::shutdown_channel();
    tokio::spawn(cluster::moves::replication_loop(cluster, shutdown.clone()));
    server::serve(router, &cfg.endpoint, shutdown).await
}
