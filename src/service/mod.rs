//! The gRPC edge. Each handler validates the request, takes the per-volume guard, calls the
//! storage domain and maps the result; no business logic lives here.

pub mod capabilities;
pub mod controller;
pub mod convert;
pub mod group;
pub mod identity;
pub mod metadata;
pub mod node;
pub mod params;

use std::{path::PathBuf, sync::Arc};

use tonic::{Response, Status};

use crate::{
    error::Result,
    storage::{guard::InFlight, node::NodeState, pool::Pool},
};

/// The topology key every berth node reports. On a single node (no agent) volumes are
/// accessible by it.
pub const TOPOLOGY_KEY: &str = "topology.berth.csi.dev/node";
/// The key of the domain a berth cluster moves volumes within: nodes running an agent
/// report it, and their volumes are accessible from the whole domain, because berth brings
/// the data to whichever node of it the pod lands on.
pub const DOMAIN_KEY: &str = "topology.berth.csi.dev/domain";

#[derive(Debug, Clone)]
pub struct DriverInfo {
    pub name: String,
    pub version: String,
    pub node_id: String,
    pub max_volumes_per_node: u32,
    /// Set on nodes that run an agent: the domain they move volumes within.
    pub topology_domain: Option<String>,
}

/// What every service shares: injected, so tests build it over a temp pool.
#[derive(Debug)]
pub struct Context {
    pub info: DriverInfo,
    pub pool: Arc<Pool>,
    pub node: Arc<NodeState>,
    pub inflight: InFlight,
    pub state_dir: PathBuf,
}

/// Maps a domain result to a gRPC response, logging a failure once, here, inside the RPC's
/// span.
pub(crate) fn respond<T>(result: Result<T>) -> Result<Response<T>, Status> {
    match result {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            let code = e.code();
            match code {
                tonic::Code::Internal | tonic::Code::Unavailable => {
                    tracing::error!(error = %e, ?code, "request failed")
                }
                _ => tracing::info!(error = %e, ?code, "request refused"),
            }
            Err(e.into())
        }
    }
}

/// A context over a pool in `dir` (any filesystem; without reflink, copies are sparse), for
/// tests that call the services directly.
#[cfg(test)]
pub(crate) async fn test_context(dir: &std::path::Path) -> Arc<Context> {
    let root = dir.join("pool");
    std::fs::create_dir_all(&root).unwrap();
    let pool = Arc::new(Pool::open(&root).await.unwrap());
    let state_dir = dir.join("state");
    let node = Arc::new(NodeState::open(&state_dir, pool.clone(), false).unwrap());
    Arc::new(Context {
        info: DriverInfo {
            name: "test.berth.csi.dev".into(),
            version: "0".into(),
            node_id: "node-1".into(),
            max_volumes_per_node: 16,
            topology_domain: None,
        },
        pool,
        node,
        inflight: InFlight::default(),
        state_dir,
    })
}
