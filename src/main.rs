use std::{path::PathBuf, process::ExitCode};

use berth::{
    daemon::{self, Config},
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
    /// Controller service (provisioning, snapshots, expansion).
    Controller(Common),
    /// Node service (stage, publish, stats, node expansion).
    Node(Common),
    /// Controller and node in one process on a pool it creates: the embedded default.
    AllInOne(Common),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (roles, c) = match cli.command {
        Command::Controller(c) => (
            Roles {
                controller: true,
                node: false,
            },
            c,
        ),
        Command::Node(c) => (
            Roles {
                controller: false,
                node: true,
            },
            c,
        ),
        Command::AllInOne(c) => (
            Roles {
                controller: true,
                node: true,
            },
            c,
        ),
    };
    init_logging(c.log_format);
    let endpoint = match Endpoint::parse(&c.endpoint) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("berth: {e}");
            return ExitCode::from(2);
        }
    };
    let node_id = c.node_id.unwrap_or_else(|| {
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into())
    });
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
        node_id,
        driver_name: c.driver_name,
        state_dir: c.state_dir,
        pool,
        max_volumes_per_node: c.max_volumes_per_node,
        direct_io: true,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(daemon::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "berth stopped");
            eprintln!("berth: {e}");
            ExitCode::FAILURE
        }
    }
}
