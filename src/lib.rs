//! berth: a CSI driver whose node-local volumes snapshot, clone, expand and move.

pub mod client;
pub mod daemon;
pub mod error;
pub mod proto;
pub mod server;
pub mod service;
pub mod storage;
pub mod util;
