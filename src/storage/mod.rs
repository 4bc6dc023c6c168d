//! The storage domain: a pool of sparse image files, the loop devices and mounts that expose
//! them, and the records that make every multi-step change crash-safe.

pub mod delta;
pub mod guard;
pub mod loopdev;
pub mod model;
pub mod mount;
pub mod node;
pub mod pool;
pub mod setup;

pub use model::*;
