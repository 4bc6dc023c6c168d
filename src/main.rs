use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use berth::{
    daemon::{self, AgentConfig, AgentTls, ClusterConfig, Config, Discovery, NodeSigner},
    lease::LeaseTimings,
    proto::admin::v1::{
        DeclareNodeGoneRequest, MigrateRequest, PromoteRequest, admin_client::AdminClient,
    },
    server::{Endpoint, Roles},
    storage::setup::PoolSource,
};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// berth: a CSI driver for databases — node-local volumes that snapshot, clone, expand and move.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Controller service (provisioning, snapshots, expansion). With --nodes, the cluster
    /// controller: it drives the agents of the listed nodes and holds no pool itself.
    Controller {
        #[command(flatten)]
        common: Common,
        /// Nodes file: one `node-id host:port` (agent address) per line.
        #[arg(long, requires = "tls_dir", conflicts_with = "node_discovery")]
        nodes: Option<PathBuf>,
        /// Find the nodes from their BerthNode objects instead of a file, elect a leader
        /// among controller replicas with a Lease, and drive VolumeMigration objects.
        #[arg(long, value_enum, requires = "tls_dir")]
        node_discovery: Option<NodeDiscovery>,
        /// The namespace of the leader-election Lease (and of --node-service-account).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        namespace: String,
        /// Sign the node plugins' certificate requests (Kubernetes CertificateSigningRequests
        /// of signer berth.csi.dev/agent) with the CA in this directory (ca.crt, ca.key).
        #[arg(long, requires_all = ["node_discovery", "node_service_account"])]
        node_ca: Option<PathBuf>,
        /// The node plugin's ServiceAccount (in --namespace): only its pod-bound tokens get a
        /// node certificate, for the node the token is bound to.
        #[arg(long, requires = "node_ca")]
        node_service_account: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Node service (stage, publish, stats, node expansion). With --agent-listen, also the
    /// node agent that lets the cluster controller and peers move volumes to and from it.
    Node {
        #[command(flatten)]
        common: Common,
        /// Address the node agent serves on (mutual TLS), e.g. 0.0.0.0:7070. Needs --tls-dir
        /// or --agent-ca.
        #[arg(long, env = "BERTH_AGENT_LISTEN")]
        agent_listen: Option<SocketAddr>,
        /// Instead of --tls-dir: ask the controller for this node's certificate through a
        /// Kubernetes CertificateSigningRequest, made with this pod's ServiceAccount token;
        /// FILE is the cluster CA's certificate.
        #[arg(long, requires = "node_discovery", conflicts_with = "tls_dir")]
        agent_ca: Option<PathBuf>,
        /// Publish this node (agent address, capacity) as a BerthNode object for the
        /// controller to find.
        #[arg(long, value_enum, requires = "agent_listen")]
        node_discovery: Option<NodeDiscovery>,
        /// The host:port peers reach this node's agent at (default: $POD_IP and the
        /// --agent-listen port).
        #[arg(long, env = "BERTH_AGENT_ADVERTISE")]
        agent_advertise: Option<String>,
        /// With --node-discovery: the namespace of this node's Lease (berth-node-NODE).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        namespace: String,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Controller and node in one process on a pool it creates: the embedded default.
    AllInOne(Common),
    /// Makes a cluster CA (kept in OUT and reused) and a certificate per name, each in
    /// OUT/<name>/ as ca.crt, tls.crt, tls.key: a --tls-dir for a node or the controller.
    /// Each certificate names its member; agents take commands only from the controller's.
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// "controller" for the controller's certificate; any other name is a node id (a DNS
        /// name: lowercase letters, digits, '-', '.').
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Fails VOLUME over to a replica because its primary's node is lost (lease expired or
    /// declared gone): for `failover: manual` volumes, or to pick the replica.
    Promote {
        volume: String,
        /// The replica's node (default: the one with the newest snapshot).
        #[arg(long)]
        to: Option<String>,
        /// The cluster controller's endpoint.
        #[arg(
            long,
            env = "CSI_ENDPOINT",
            default_value = "unix:///var/lib/berth/csi.sock"
        )]
        endpoint: String,
    },
    /// Declares NODE gone for good: its replicated volumes fail over now, without waiting
    /// for its lease to expire. Only once the node is powered off or cut from its disks.
    NodeGone {
        node: String,
        /// The cluster controller's endpoint.
        #[arg(
            long,
            env = "CSI_ENDPOINT",
            default_value = "unix:///var/lib/berth/csi.sock"
        )]
        endpoint: String,
    },
    /// Prints the CustomResourceDefinitions berth uses (BerthNode, VolumeMigration).
    Crd,
    /// Started by a node agent: fences the node's replicated primaries when its lease
    /// lapses, even if the agent is frozen or dead (docs/moving.md).
    #[command(hide = true)]
    FenceKeeper {
        /// The pool's volume directory: images and their records.
        #[arg(long)]
        volumes: PathBuf,
    },
    /// Pre-warms a move: ships VOLUME to NODE while it stays in use where it is, so the
    /// cut-over (the next publish on NODE) ships only the last seconds of change.
    Migrate {
        volume: String,
        #[arg(long)]
        to: String,
        /// The cluster controller's endpoint.
        #[arg(
            long,
            env = "CSI_ENDPOINT",
            default_value = "unix:///var/lib/berth/csi.sock"
        )]
        endpoint: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum NodeDiscovery {
    Kubernetes,
}

#[derive(Args, Clone)]
struct ClusterArgs {
    /// Directory with ca.crt, tls.crt, tls.key (a Kubernetes TLS Secret plus its CA).
    #[arg(long, env = "BERTH_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The topology domain volumes move within (reported as topology.berth.csi.dev/domain).
    #[arg(long, default_value = "default")]
    topology_domain: String,
    /// How often a node's liveness lease is renewed (docs/moving.md, "When a node dies").
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    lease_period: std::time::Duration,
    /// How long after a node's last renewal the controller may fail its volumes over.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_duration: std::time::Duration,
    /// How long after its last renewal a node fences its replicated primaries; shorter
    /// than --lease-duration by a margin for clock drift and a late fence.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    lease_fence_after: std::time::Duration,
}

impl ClusterArgs {
    fn lease(&self) -> Option<LeaseTimings> {
        let t = LeaseTimings {
            period: self.lease_period,
            duration: self.lease_duration,
            fence_after: self.lease_fence_after,
        };
        match t.check() {
            Ok(()) => Some(t),
            Err(e) => {
                eprintln!("berth: {e}");
                None
            }
        }
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 2s or 500ms"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        _ => Err(format!("{s:?} is not a duration like 2s or 500ms")),
    }
}

#[derive(Args, Clone)]
struct Common {
    /// Where to serve CSI: unix:///path/csi.sock or tcp://host:port.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/berth/csi.sock"
    )]
    endpoint: String,
    /// This node's id (default: the hostname).
    #[arg(long)]
    node_id: Option<String>,
    #[arg(long, default_value = "/var/lib/berth")]
    state_dir: PathBuf,
    #[arg(long, default_value = "berth.csi.dev")]
    driver_name: String,
    /// Size of the embedded pool image (sparse), e.g. 64Gi, 500Mi, 1Ti.
    #[arg(long, default_value = "64Gi", value_parser = parse_size)]
    pool_size: u64,
    /// Use this block device as the pool (formatted XFS only if blank).
    #[arg(long, conflicts_with = "pool_dir")]
    pool_device: Option<PathBuf>,
    /// Use this existing directory as the pool (reflink needs XFS or btrfs).
    #[arg(long)]
    pool_dir: Option<PathBuf>,
    /// Largest number of volumes this node attaches (reported in NodeGetInfo; default 1000).
    #[arg(long)]
    max_volumes_per_node: Option<u32>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 0.0.0.0:9810 (default: off).
    #[arg(long, env = "BERTH_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n >= 512 << 20)
        .ok_or_else(|| format!("{s:?} is not a size of at least 512Mi (e.g. 64Gi)"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn finish(r: berth::error::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "berth stopped");
            eprintln!("berth: {e}");
            ExitCode::FAILURE
        }
    }
}

fn endpoint(s: &str) -> Option<Endpoint> {
    Endpoint::parse(s).map_err(|e| eprintln!("berth: {e}")).ok()
}

fn node_id(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into())
    })
}

/// `berth migrate`: prints progress lines until the target is ready to cut over.
async fn migrate(endpoint: &str, volume: String, to: String) -> Result<(), String> {
    let mut stream = admin(endpoint)
        .await?
        .migrate(MigrateRequest {
            volume_id: volume.clone(),
            to_node_id: to.clone(),
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    while let Some(p) = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        match p.phase.as_str() {
            "ready" => {
                println!("ready: {}", p.message);
                return Ok(());
            }
            _ => {
                let pct = (p.bytes_done * 100)
                    .checked_div(p.bytes_total)
                    .unwrap_or(100);
                println!(
                    "round {}: {} / {} MiB ({pct}%)",
                    p.round,
                    p.bytes_done >> 20,
                    p.bytes_total >> 20
                );
            }
        }
    }
    Err("the controller ended the migration without reaching ready".into())
}

async fn admin(endpoint: &str) -> Result<AdminClient<tonic::transport::Channel>, String> {
    let channel = berth::client::connect(endpoint)
        .await
        .map_err(|e| format!("cannot reach the controller at {endpoint}: {e}"))?;
    Ok(AdminClient::new(channel))
}

async fn promote(endpoint: &str, volume: String, to: Option<String>) -> Result<(), String> {
    let r = admin(endpoint)
        .await?
        .promote(PromoteRequest {
            volume_id: volume.clone(),
            to_node_id: to.unwrap_or_default(),
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    println!("volume {volume} now lives on {}", r.primary_node_id);
    Ok(())
}

async fn node_gone(endpoint: &str, node: String) -> Result<(), String> {
    let r = admin(endpoint)
        .await?
        .declare_node_gone(DeclareNodeGoneRequest {
            node_id: node.clone(),
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    for v in &r.failed_over {
        println!("failed over: {v}");
    }
    for v in &r.left {
        println!("not failed over: {v}");
    }
    println!(
        "node {node} declared gone: {} volume(s) failed over, {} left",
        r.failed_over.len(),
        r.left.len()
    );
    Ok(())
}

fn report(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (roles, c, agent) = match cli.command {
        Command::Certs { out, names } => {
            return match berth::tls::generate(&out, &names) {
                Ok(dirs) => {
                    for d in dirs {
                        println!("{}", d.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("berth: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Migrate {
            volume,
            to,
            endpoint,
        } => {
            return report(runtime().block_on(migrate(&endpoint, volume, to)));
        }
        Command::Crd => {
            print!("{}", berth::kube::crd::crds_yaml());
            return ExitCode::SUCCESS;
        }
        Command::FenceKeeper { volumes } => return finish(berth::lease::run_keeper(&volumes)),
        Command::Promote {
            volume,
            to,
            endpoint,
        } => return report(runtime().block_on(promote(&endpoint, volume, to))),
        Command::NodeGone { node, endpoint } => {
            return report(runtime().block_on(node_gone(&endpoint, node)));
        }
        Command::Controller {
            common,
            nodes,
            node_discovery,
            namespace,
            node_ca,
            node_service_account,
            cluster,
        } if nodes.is_some() || node_discovery.is_some() => {
            init_logging(common.log_format);
            let Some(endpoint) = endpoint(&common.endpoint) else {
                return ExitCode::from(2);
            };
            // A controller replica's id (its pod name in Kubernetes) tells the Lease holders
            // apart.
            let node_id = node_id(common.node_id);
            let node_signer = node_ca.map(|ca_dir| NodeSigner {
                ca_dir,
                node_username: berth::kube::csr::service_account_username(
                    &namespace,
                    &node_service_account.expect("clap requires --node-service-account"),
                ),
            });
            let discovery = match nodes {
                Some(file) => Discovery::File(file),
                None => Discovery::Kubernetes {
                    namespace,
                    instance: node_id.clone(),
                },
            };
            let Some(lease) = cluster.lease() else {
                return ExitCode::from(2);
            };
            let cfg = ClusterConfig {
                lease,
                endpoint,
                driver_name: common.driver_name,
                node_id,
                discovery,
                tls_dir: cluster.tls_dir.expect("clap requires --tls-dir"),
                domain: cluster.topology_domain,
                metrics_listen: common.metrics_listen,
                node_signer,
                state_dir: common.state_dir,
            };
            return finish(runtime().block_on(daemon::run_cluster(cfg)));
        }
        Command::Controller { common, .. } => (
            Roles {
                controller: true,
                node: false,
            },
            common,
            None,
        ),
        Command::Node {
            common,
            agent_listen,
            node_discovery,
            agent_advertise,
            agent_ca,
            namespace,
            cluster,
        } => {
            let Some(lease) = cluster.lease() else {
                return ExitCode::from(2);
            };
            let advertise = match (node_discovery, agent_advertise, agent_listen) {
                (None, _, _) => None,
                (Some(_), Some(a), _) => Some(a),
                (Some(_), None, Some(listen)) => match std::env::var("POD_IP") {
                    Ok(ip) if !ip.is_empty() => Some(format!("{ip}:{}", listen.port())),
                    _ => {
                        eprintln!(
                            "berth: --node-discovery kubernetes needs --agent-advertise or $POD_IP: the address peers reach this agent at"
                        );
                        return ExitCode::from(2);
                    }
                },
                (Some(_), None, None) => unreachable!("clap requires --agent-listen"),
            };
            (
                Roles {
                    controller: false,
                    node: true,
                },
                common,
                match (agent_listen, cluster.tls_dir, agent_ca) {
                    (None, _, _) => None,
                    (Some(listen), tls_dir, agent_ca) => Some(AgentConfig {
                        listen,
                        tls: match (tls_dir, agent_ca) {
                            (Some(dir), _) => AgentTls::Dir(dir),
                            (None, Some(ca)) => AgentTls::Csr { ca },
                            (None, None) => {
                                eprintln!(
                                    "berth: --agent-listen needs --tls-dir or --agent-ca: the agent serves mutual TLS"
                                );
                                return ExitCode::from(2);
                            }
                        },
                        domain: cluster.topology_domain,
                        advertise,
                        namespace,
                        lease,
                    }),
                },
            )
        }
        Command::AllInOne(c) => (
            Roles {
                controller: true,
                node: true,
            },
            c,
            None,
        ),
    };
    init_logging(c.log_format);
    let Some(endpoint) = endpoint(&c.endpoint) else {
        return ExitCode::from(2);
    };
    let pool = match (c.pool_device, c.pool_dir) {
        (Some(d), _) => PoolSource::Device(d),
        (None, Some(d)) => PoolSource::Directory(d),
        (None, None) => PoolSource::Image {
            size_bytes: c.pool_size,
        },
    };
    let cfg = Config {
        roles,
        endpoint,
        node_id: node_id(c.node_id),
        driver_name: c.driver_name,
        state_dir: c.state_dir,
        pool,
        max_volumes_per_node: c.max_volumes_per_node,
        direct_io: true,
        agent,
        metrics_listen: c.metrics_listen,
    };
    finish(runtime().block_on(daemon::run(cfg)))
}
