//! Generated CSI v1.12 protocol code. Nothing here is written by hand.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
