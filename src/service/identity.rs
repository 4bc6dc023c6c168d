//! CSI Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{DriverInfo, capabilities, respond};
use crate::{
    error::Result,
    proto::csi::v1::{self as csi, identity_server::Identity, plugin_capability},
    storage::pool::Pool,
};

/// What Probe asks: whether this process can serve right now.
pub trait Health: Send + Sync + std::fmt::Debug + 'static {
    /// Blocking; called off the async runtime.
    fn check(&self) -> Result<()>;
}

impl Health for Pool {
    /// Ready only while the pool is mounted and takes a durable write.
    fn check(&self) -> Result<()> {
        self.probe()
    }
}

#[derive(Debug, Clone)]
pub struct IdentityService {
    info: DriverInfo,
    health: Arc<dyn Health>,
    controller: bool,
}

impl IdentityService {
    pub fn new(info: DriverInfo, health: Arc<dyn Health>, controller: bool) -> Self {
        Self {
            info,
            health,
            controller,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.info.name.clone(),
            vendor_version: self.info.version.clone(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::{Service, Type, VolumeExpansion};
        let mut caps: Vec<csi::PluginCapability> = capabilities::plugin_services(self.controller)
            .into_iter()
            .map(|t| csi::PluginCapability {
                r#type: Some(Type::Service(Service { r#type: t as i32 })),
            })
            .collect();
        caps.push(csi::PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                r#type: capabilities::EXPANSION as i32,
            })),
        });
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let health = self.health.clone();
        let result = tokio::task::spawn_blocking(move || health.check())
            .await
            .expect("probe task panicked");
        respond(result.map(|()| csi::ProbeResponse { ready: Some(true) }))
    }
}
