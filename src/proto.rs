//! Generated protocol code: CSI v1.12 and berth's own agent and admin APIs. Nothing here is
//! written by hand.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("berth.agent.v1");
    }
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("berth.admin.v1");
    }
}
