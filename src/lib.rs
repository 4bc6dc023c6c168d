//! berth: a CSI driver whose node-local volumes snapshot, clone, expand and move.

pub mod agent;
pub mod client;
pub mod cluster;
pub mod daemon;
pub mod error;
pub mod kube;
pub mod lease;
pub mod metrics;
pub mod placement;
pub mod proto;
pub mod server;
pub mod service;
pub mod storage;
pub mod tls;
pub mod util;
