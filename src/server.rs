//! Serving the CSI services on a unix socket (0600, a stale socket replaced, a live one
//! refused) or TCP, with a graceful drain on SIGTERM/SIGINT.

use std::{
    fs,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{net::UnixListener, sync::watch};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::{Server, server::Router};
use tower::layer::util::{Identity, Stack};

use crate::{
    error::{Error, Result},
    metrics::{CsiLayer, Metrics},
    proto::csi::v1::{
        controller_server::ControllerServer, group_controller_server::GroupControllerServer,
        identity_server::IdentityServer, node_server::NodeServer,
        snapshot_metadata_server::SnapshotMetadataServer,
    },
    service::{
        Context, controller::ControllerService, group::GroupService, identity::IdentityService,
        metadata::MetadataService, node::NodeService,
    },
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint> {
        if let Some(p) = s.strip_prefix("unix://") {
            // unix:///abs/path and unix:/abs/path both occur in the wild.
            let path = PathBuf::from(p);
            if !path.is_absolute() {
                return Err(Error::invalid(
                    "endpoint",
                    format!("{s:?}: the socket path must be absolute"),
                ));
            }
            Ok(Endpoint::Unix(path))
        } else if let Some(p) = s.strip_prefix("unix:") {
            Endpoint::parse(&format!("unix://{p}"))
        } else if let Some(a) = s.strip_prefix("tcp://") {
            Ok(Endpoint::Tcp(a.to_string()))
        } else {
            Err(Error::invalid(
                "endpoint",
                format!("{s:?}: expected unix:///path or tcp://host:port"),
            ))
        }
    }
}

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub controller: bool,
    pub node: bool,
}

/// Refuses to start on a socket something still answers on: removing it would take the
/// live driver's endpoint from under it (its clients would reach the newcomer, and the
/// newcomer would repair node state the live one is using). A socket nobody listens on
/// (ECONNREFUSED) is a crashed run's, and is replaced. Checked before berth touches any
/// state, and again just before the bind.
pub fn refuse_live_socket(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(Error::invalid(
                "endpoint",
                format!(
                    "{} is in use: another driver answers on it; stop it first, or give this one another endpoint",
                    path.display()
                ),
            )),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::io("probe existing socket", path)(e)),
        },
        _ => Ok(()),
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            refuse_live_socket(path)?;
            fs::remove_file(path).map_err(Error::io("remove stale socket", path))?;
        }
        Ok(_) => {
            return Err(Error::invalid(
                "endpoint",
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
        Err(_) => {}
    }
    // Created under a 0177 umask so there is no window in which the socket is open to others.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(Error::io("bind", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(Error::io("chmod", path))?;
    Ok(listener)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining in-flight requests"),
        _ = int.recv() => tracing::info!("SIGINT: draining in-flight requests"),
    }
}

/// One stop signal for every server and background task of the process.
pub fn shutdown_channel() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    rx
}

/// Resolves once `rx` says stop.
pub async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// A CSI server whose every call is counted and timed in [`Metrics`].
pub type CsiRouter = Router<Stack<CsiLayer, Identity>>;

/// A server builder for CSI services, recording into `metrics`.
pub fn csi_server(metrics: &Arc<Metrics>) -> Server<Stack<CsiLayer, Identity>> {
    Server::builder().layer(metrics.csi_layer())
}

/// The CSI services of a single-pool process.
pub fn csi_router(ctx: Arc<Context>, roles: Roles, metrics: &Arc<Metrics>) -> CsiRouter {
    let mut router = csi_server(metrics).add_service(IdentityServer::new(IdentityService::new(
        ctx.info.clone(),
        ctx.pool.clone(),
        roles.controller,
    )));
    if roles.controller {
        router = router
            .add_service(ControllerServer::new(ControllerService::new(ctx.clone())))
            .add_service(GroupControllerServer::new(GroupService::new(ctx.clone())))
            .add_service(SnapshotMetadataServer::new(MetadataService::new(
                ctx.pool.clone(),
            )));
    }
    if roles.node {
        router = router.add_service(NodeServer::new(NodeService::new(ctx.clone())));
    }
    router
}

/// Serves `router` until `shutdown`, then lets in-flight RPCs finish and removes the socket.
pub async fn serve(
    router: CsiRouter,
    endpoint: &Endpoint,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let served = match endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            tracing::info!(endpoint = %path.display(), "serving CSI");
            let r = router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped(shutdown))
                .await;
            let _ = fs::remove_file(path);
            r
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(Error::io("bind", addr.as_str()))?;
            tracing::info!(endpoint = %addr, "serving CSI");
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped(shutdown))
                .await
        }
    };
    served.map_err(|e| Error::Io {
        op: "serve",
        path: PathBuf::from(format!("{endpoint:?}")),
        source: std::io::Error::other(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("unix:///run/csi.sock").unwrap(),
            Endpoint::Unix("/run/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("unix:/run/csi.sock").unwrap(),
            Endpoint::Unix("/run/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:10000").unwrap(),
            Endpoint::Tcp("127.0.0.1:10000".into())
        );
        for bad in ["", "/run/csi.sock", "unix://relative", "http://x"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    /// A second server on a live socket is refused and the first keeps serving on it; once
    /// the first is gone its socket is stale and replaced (issue 11, item 10).
    #[tokio::test]
    async fn a_live_socket_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("csi.sock");
        let first = bind_unix(&p).unwrap();
        let err = bind_unix(&p).expect_err("a second server on a live socket");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("in use"), "{err}");
        let _client = tokio::net::UnixStream::connect(&p)
            .await
            .expect("the first server's socket is still in place");
        first.accept().await.expect("and the first server answers");
        drop(first);
        bind_unix(&p).expect("a socket nobody listens on is replaced");
    }

    #[tokio::test]
    async fn socket_is_private_and_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("csi.sock");
        drop(bind_unix(&p).unwrap());
        let l = bind_unix(&p).expect("stale socket replaced");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(l);
        let f = dir.path().join("file");
        fs::write(&f, b"x").unwrap();
        assert!(bind_unix(&f).is_err(), "a regular file is never removed");
    }
}
