//! Starting a berth process: privileges, pool, crash reconciliation, then serving.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::{
    agent,
    cluster::{self, Cluster, ClusterHealth, admin::ClusterMigrator},
    error::{Error, Result},
    kube::{self, ClusterApi, KubeApi, crd::BerthNodeSpec},
    lease::{LeaseTimings, NodeLease},
    metrics::{self, Metrics},
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
    pub tls: AgentTls,
    pub domain: String,
    /// In Kubernetes: the address peers reach the agent at, published in the node's
    /// BerthNode object so the controller finds it.
    pub advertise: Option<String>,
    /// In Kubernetes: the namespace of the node's Lease, which the node renews itself.
    pub namespace: String,
    pub lease: LeaseTimings,
}

/// Where a node's agent gets its certificate.
#[derive(Debug, Clone)]
pub enum AgentTls {
    /// A directory with ca.crt, tls.crt, tls.key (`berth certs`, a Secret).
    Dir(PathBuf),
    /// In Kubernetes: a CertificateSigningRequest the controller signs
    /// (crate::kube::csr), checked against the CA certificate at this path.
    Csr { ca: PathBuf },
}

/// The controller's signer of node certificates (crate::kube::csr): the CA's directory
/// (ca.crt, ca.key) and the username of the node plugin's ServiceAccount.
#[derive(Debug, Clone)]
pub struct NodeSigner {
    pub ca_dir: PathBuf,
    pub node_username: String,
}

/// How the cluster controller learns its nodes.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// A nodes file (`--nodes`).
    File(PathBuf),
    /// BerthNode objects in the Kubernetes API; leader election with a Lease in
    /// `namespace` among the controller's replicas, which are told apart by `instance`.
    Kubernetes { namespace: String, instance: String },
}

/// How often a node republishes its BerthNode, and the controller lists them.
const HEARTBEAT: Duration = Duration::from_secs(30);
const DISCOVERY: Duration = Duration::from_secs(10);
/// How long a controller leads without renewing: a standby takes over this long after the
/// leader dies.
const LEASE: Duration = Duration::from_secs(15);
const LEASE_NAME: &str = "berth-controller";
/// How often a node polls for its signed certificate, and the controller for requests.
const CSR_POLL: Duration = Duration::from_secs(2);

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
    /// Where to serve /metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// `berth controller --nodes FILE` or `--node-discovery kubernetes`: drives node agents,
/// holds no pool.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub endpoint: Endpoint,
    pub driver_name: String,
    pub node_id: String,
    pub discovery: Discovery,
    pub tls_dir: PathBuf,
    pub domain: String,
    /// Where to serve /metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Signs the node plugins' certificate requests (Kubernetes discovery only).
    pub node_signer: Option<NodeSigner>,
    /// With a nodes file, the placement records live in `placement/` here (in Kubernetes,
    /// they are BerthVolume objects).
    pub state_dir: PathBuf,
    pub lease: LeaseTimings,
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
    let mut pool = Pool::open(&root).await?;
    if let setup::PoolSource::Image { .. } = cfg.pool {
        pool = pool.bounded_by_host(&cfg.state_dir);
    }
    let pool = Arc::new(pool);
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

/// The agent's certificate at start: read, or to be asked for.
enum AgentCert {
    Loaded(TlsMaterial),
    Ask { ca: PathBuf },
}

pub async fn run(cfg: Config) -> Result<()> {
    let started = Instant::now();
    // Read before touching the pool: bad TLS material is a configuration error to report
    // at once. A certificate asked for is waited for beside the CSI service, which needs
    // none: the node serves its own volumes while the controller is still starting.
    let tls = match cfg.agent.as_ref().map(|a| &a.tls) {
        Some(AgentTls::Dir(dir)) => Some(AgentCert::Loaded(TlsMaterial::load(dir)?)),
        Some(AgentTls::Csr { ca }) => {
            std::fs::metadata(ca).map_err(Error::io("read", ca))?;
            Some(AgentCert::Ask { ca: ca.clone() })
        }
        None => None,
    };
    // Before any state is touched: a second driver must not repair node state a live one
    // is using.
    if let server::Endpoint::Unix(path) = &cfg.endpoint {
        server::refuse_live_socket(path)?;
    }
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let ctx = prepare(&cfg).await?;
    let metrics = Arc::new(Metrics::default().with_pool(&cfg.node_id, ctx.pool.clone()));
    tracing::info!(
        node.id = %cfg.node_id,
        pool = %ctx.pool.root().display(),
        reflink = ctx.pool.reflink(),
        startup_ms = started.elapsed().as_millis() as u64,
        "berth ready"
    );
    let shutdown = server::shutdown_channel();
    if let Some(l) = metrics_listener {
        tokio::spawn(metrics::serve(l, metrics.clone(), shutdown.clone()));
    }
    // Before the agent serves: a lease that lapsed while no agent ran fences at once.
    let lease = match &cfg.agent {
        Some(a) => {
            let lease = NodeLease::start(ctx.pool.clone(), &cfg.state_dir, a.lease.fence_after)?;
            if lease.lapsed() {
                let n = lease.fence_all().await?;
                tracing::warn!(
                    volumes = n,
                    "the lease lapsed while no agent ran: replicated primaries fenced until the controller resumes them"
                );
            }
            tokio::spawn(lease.clone().watch(shutdown.clone()));
            Some(lease)
        }
        None => None,
    };
    if let Some(a) = &cfg.agent
        && let Some(advertise) = &a.advertise
    {
        let api: Arc<dyn ClusterApi> =
            Arc::new(KubeApi::connect(cfg.driver_name.clone(), cfg.node_id.clone()).await?);
        // In Kubernetes the node renews its own Lease; with a nodes file the controller
        // renews it (RenewLease).
        if let Some(lease) = lease.clone() {
            tokio::spawn(kube::node_lease(
                api.clone(),
                a.namespace.clone(),
                cfg.node_id.clone(),
                a.lease.period,
                a.lease.duration,
                move |sent| lease.renewed(sent),
                shutdown.clone(),
            ));
        }
        let spec = BerthNodeSpec {
            agent_address: advertise.clone(),
            domain: a.domain.clone(),
        };
        let pool = ctx.pool.clone();
        let capacity = move || {
            pool.capacity()
                .map(|c| (c.total_bytes, c.available_bytes))
                .unwrap_or((0, 0))
        };
        tokio::spawn(kube::node_heartbeat(
            api,
            cfg.node_id.clone(),
            spec,
            capacity,
            HEARTBEAT,
            shutdown.clone(),
        ));
    }
    let Some((a, tls)) = cfg.agent.zip(tls) else {
        return server::serve(
            server::csi_router(ctx.clone(), cfg.roles, &metrics),
            &cfg.endpoint,
            shutdown.clone(),
        )
        .await;
    };
    // The CSI service stops (draining) on the process's stop signal, or when the agent
    // cannot serve: a node plugin whose certificate request was denied exits and says why,
    // rather than running on without its agent.
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn({
        let (mut shutdown, stop_tx) = (shutdown.clone(), stop_tx.clone());
        async move {
            let _ = shutdown.wait_for(|s| *s).await;
            let _ = stop_tx.send(true);
        }
    });
    let csi = server::serve(
        server::csi_router(ctx.clone(), cfg.roles, &metrics),
        &cfg.endpoint,
        stop,
    );
    let node_id = cfg.node_id.clone();
    let counters = metrics.transfer_counters();
    let agent = async move {
        let tls = match tls {
            AgentCert::Loaded(tls) => tls,
            AgentCert::Ask { ca } => {
                let client = kube::connect().await?;
                kube::csr::request_node_certificate(client, &node_id, &ca, CSR_POLL).await?
            }
        };
        agent::serve(
            ctx,
            a.listen,
            tls,
            counters,
            lease,
            server::stopped(shutdown),
        )
        .await
    };
    let agent = async move {
        let r = agent.await;
        if r.is_err() {
            let _ = stop_tx.send(true);
        }
        r
    };
    let (c, a) = tokio::join!(csi, agent);
    a.and(c)
}

/// Runs the cluster controller: CSI Controller, GroupController and berth's Admin API on
/// the endpoint, replication in the background. Needs no root: it touches no storage.
pub async fn run_cluster(cfg: ClusterConfig) -> Result<()> {
    let tls = TlsMaterial::load(&cfg.tls_dir)?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let shutdown = server::shutdown_channel();
    if let Some(l) = metrics_listener {
        tokio::spawn(metrics::serve(l, metrics.clone(), shutdown.clone()));
    }
    let (leader_tx, leader) = watch::channel(false);
    let cluster = match &cfg.discovery {
        Discovery::File(path) => {
            // One controller per nodes file: it always leads.
            let _ = leader_tx.send(true);
            let store = crate::placement::FileStore::open(&cfg.state_dir.join("placement"))?;
            let leases = cluster::failover::FileLeases::open(cfg.state_dir.join("leases"))?;
            Arc::new(
                Cluster::load(
                    path,
                    &tls,
                    cfg.domain.clone(),
                    metrics.clone(),
                    Arc::new(store),
                )?
                .with_leases(Arc::new(leases), cfg.lease),
            )
        }
        Discovery::Kubernetes {
            namespace,
            instance,
        } => {
            let api: Arc<dyn ClusterApi> =
                Arc::new(KubeApi::connect(cfg.driver_name.clone(), instance.clone()).await?);
            let store = kube::PlacementApi::new(kube::connect().await?);
            let leases = cluster::failover::KubeLeases::new(api.clone(), namespace.clone());
            let cluster = Arc::new(
                Cluster::new(
                    Default::default(),
                    &tls,
                    cfg.domain.clone(),
                    Some(api.clone()),
                    metrics.clone(),
                    Arc::new(store),
                )?
                .with_leases(Arc::new(leases), cfg.lease),
            );
            if let Some(signer) = &cfg.node_signer {
                // Every replica signs (a request handled twice fails its resourceVersion
                // check): nodes get their certificates even while no replica leads.
                let issuer = crate::tls::NodeIssuer::load(&signer.ca_dir)?;
                let client = kube::connect().await?;
                tokio::spawn(kube::csr::signer(
                    client,
                    issuer,
                    signer.node_username.clone(),
                    CSR_POLL,
                    shutdown.clone(),
                ));
            }
            let members = cluster.clone();
            tokio::spawn(kube::discover_nodes(
                api.clone(),
                cfg.domain.clone(),
                move |nodes| {
                    if let Err(e) = members.set_members(nodes) {
                        tracing::warn!(error = %e, "discovered nodes not taken");
                    }
                },
                DISCOVERY,
                shutdown.clone(),
            ));
            tokio::spawn(kube::leader_election(
                api.clone(),
                namespace.clone(),
                LEASE_NAME.to_string(),
                instance.clone(),
                LEASE,
                leader_tx,
                shutdown.clone(),
            ));
            tokio::spawn(while_leading(
                leader.clone(),
                shutdown.clone(),
                api,
                Arc::new(ClusterMigrator(cluster.clone())),
            ));
            cluster
        }
    };
    // One poll before serving: placement needs the nodes' free space, and a volume made
    // before placement records existed must be adopted before a create of its name.
    cluster.poll_all().await;
    tracing::info!(nodes = ?cluster.node_ids(), domain = %cfg.domain, "berth cluster controller ready");
    let info = DriverInfo {
        name: cfg.driver_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        node_id: cfg.node_id.clone(),
        max_volumes_per_node: DEFAULT_MAX_VOLUMES,
        topology_domain: Some(cfg.domain.clone()),
    };
    let controller = cluster::controller::ClusterController::new(cluster.clone());
    let router = server::csi_server(&metrics)
        .add_service(IdentityServer::new(IdentityService::new(
            info,
            Arc::new(ClusterHealth),
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
    tokio::spawn(cluster::monitor::monitor_loop(
        cluster.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(cluster::failover::renewal_loop(
        cluster.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(cluster::failover::failover_loop(
        cluster.clone(),
        leader.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(cluster::moves::replication_loop(
        cluster,
        leader,
        shutdown.clone(),
    ));
    server::serve(router, &cfg.endpoint, shutdown).await
}

/// Drives VolumeMigration objects only while this controller leads: started when it
/// becomes leader, stopped when it stops being one.
async fn while_leading(
    mut leader: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    api: Arc<dyn ClusterApi>,
    migrator: Arc<ClusterMigrator>,
) {
    loop {
        if leader.wait_for(|l| *l).await.is_err() {
            return;
        }
        tracing::info!("leading: driving VolumeMigrations and replication");
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(kube::migrations(
            api.clone(),
            migrator.clone(),
            None,
            stop_rx,
        ));
        let lost = leader.wait_for(|l| !*l).await.is_err();
        let _ = stop_tx.send(true);
        let _ = task.await;
        if lost || *shutdown.borrow() {
            return;
        }
        tracing::info!("no longer leading");
    }
}
