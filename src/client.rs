//! Connecting to a berth endpoint as a CSI client (tests, benchmarks, tooling).

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use crate::server::Endpoint;

pub async fn connect(endpoint: &str) -> Result<Channel, Box<dyn std::error::Error + Send + Sync>> {
    match Endpoint::parse(endpoint)? {
        Endpoint::Unix(path) => {
            let path: PathBuf = path;
            // The URI is required by tonic but unused: the connector dials the socket.
            Ok(TonicEndpoint::try_from("http://[::]:50051")?
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await?)
        }
        Endpoint::Tcp(addr) => Ok(TonicEndpoint::try_from(format!("http://{addr}"))?
            .connect()
            .await?),
    }
}
